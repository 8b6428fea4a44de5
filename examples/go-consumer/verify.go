package main

// Verification of one raw Kafka record, in the order docs/events.md prescribes: size, headers,
// signer, signature over the raw bytes, and only then parsing (canonical form, envelope, data).
// Each refusal carries one of the reason codes the Python Subscriber logs.

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"math/big"
	"regexp"
	"strconv"
)

const (
	MaxMessageBytes = 64 * 1024
	SignatureHeader = "ckms-sig"
	KeyIDHeader     = "ckms-kid"
	EnvelopeVersion = 1
)

var maxSeq = new(big.Int).SetUint64(1<<63 - 1)

// Rejection is a refused record: Reason is the stable code, Detail says more for the log.
type Rejection struct {
	Reason string
	Detail string
}

func (r *Rejection) Error() string { return r.Reason + ": " + r.Detail }

func reject(reason, format string, args ...any) *Rejection {
	return &Rejection{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// Header is one Kafka record header; a nil Value is a null header, which counts as absent.
type Header struct {
	Key   string
	Value []byte
}

// Event is a verified envelope. Data is the parsed, schema-checked data object.
type Event struct {
	V      int64
	ID     string
	Seq    int64
	Type   string
	At     string
	Data   Object
	Signer string
}

// KeyID names an Ed25519 public key: "ed25519:" + base64url(sha256(public)[:16]), unpadded.
func KeyID(public ed25519.PublicKey) string {
	sum := sha256.Sum256(public)
	return "ed25519:" + base64.RawURLEncoding.EncodeToString(sum[:16])
}

// Verifier holds the pinned controller keys (by key id) and the data schemas.
type Verifier struct {
	Trust   map[string]ed25519.PublicKey
	Schemas *Schemas
}

func oneHeader(headers []Header, name string) ([]byte, *Rejection) {
	var found [][]byte
	for _, h := range headers {
		if h.Key == name && h.Value != nil {
			found = append(found, h.Value)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return nil, reject("unsigned", "header %s is missing", name)
	default:
		return nil, reject("unsigned", "header %s is repeated", name)
	}
}

// Verify checks one record. value is nil for a record without a value.
func (v *Verifier) Verify(value []byte, headers []Header) (*Event, *Rejection) {
	if value == nil {
		return nil, reject("malformed", "message has no value")
	}
	if len(value) > MaxMessageBytes {
		return nil, reject("oversized", "message of %d bytes exceeds %d", len(value), MaxMessageBytes)
	}
	sig, r := oneHeader(headers, SignatureHeader)
	if r != nil {
		return nil, r
	}
	kidBytes, r := oneHeader(headers, KeyIDHeader)
	if r != nil {
		return nil, r
	}
	kid := string(kidBytes)
	public, ok := v.Trust[kid]
	if !ok {
		return nil, reject("unknown-signer", "signer %.40q is not trusted", kid)
	}
	if len(sig) != ed25519.SignatureSize || !ed25519.Verify(public, value, sig) {
		return nil, reject("bad-signature", "signature by %s does not verify", kid)
	}
	// Only now is the value read at all.
	parsed, err := ParseCanonical(value)
	if err != nil {
		return nil, reject("malformed", "%v", err)
	}
	raw, ok := parsed.(Object)
	if !ok {
		return nil, reject("malformed", "message is not a JSON object")
	}
	if n, ok := raw["v"].(Number); !ok || !n.IsInt || n.Int.Cmp(big.NewInt(EnvelopeVersion)) != 0 {
		return nil, reject("unsupported-version", "envelope version is not supported")
	}
	etype, ok := raw["type"].(string)
	if !ok || !v.Schemas.Known(etype) {
		return nil, reject("unknown-type", "unknown event type")
	}
	for _, name := range []string{"id", "seq", "at", "data"} {
		if _, ok := raw[name]; !ok {
			return nil, reject("malformed", "envelope fields are wrong (missing %s)", name)
		}
	}
	if len(raw) != 6 {
		return nil, reject("malformed", "envelope fields are wrong (unexpected fields)")
	}
	seq, ok := raw["seq"].(Number)
	if !ok || !seq.IsInt || seq.Int.Sign() < 0 || seq.Int.Cmp(maxSeq) > 0 {
		return nil, reject("malformed", "envelope seq must be an integer from 0 to 2**63-1")
	}
	id, idOK := raw["id"].(string)
	at, atOK := raw["at"].(string)
	if !idOK || !atOK {
		return nil, reject("malformed", "envelope id and at must be strings")
	}
	if !validTime(at) {
		return nil, reject("malformed", "bad event time: expected RFC 3339 UTC")
	}
	data, ok := raw["data"].(Object)
	if !ok {
		return nil, reject("invalid-data", "%s data is not a JSON object", etype)
	}
	if err := v.Schemas.ValidateData(etype, data); err != nil {
		return nil, reject("invalid-data", "%s data is invalid: %v", etype, err)
	}
	if err := targetsAgree(data); err != nil {
		return nil, reject("invalid-data", "%s data is invalid: %v", etype, err)
	}
	return &Event{
		V: EnvelopeVersion, ID: id, Seq: seq.Int.Int64(), Type: etype, At: at, Data: data, Signer: kid,
	}, nil
}

var timeRE = regexp.MustCompile(`^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.[0-9]{6}Z$`)

// validTime accepts exactly YYYY-MM-DDTHH:MM:SS.ffffffZ naming a real instant (year 1-9999,
// no leap seconds).
func validTime(at string) bool {
	m := timeRE.FindStringSubmatch(at)
	if m == nil {
		return false
	}
	n := make([]int, 7)
	for i := 1; i <= 6; i++ {
		n[i], _ = strconv.Atoi(m[i])
	}
	year, month, day, hour, minute, second := n[1], n[2], n[3], n[4], n[5], n[6]
	if year < 1 || month < 1 || month > 12 || hour > 23 || minute > 59 || second > 59 {
		return false
	}
	days := [13]int{0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}
	if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
		days[2] = 29
	}
	return day >= 1 && day <= days[month]
}

// targetsAgree is the one data rule a JSON Schema cannot state: when targets name an
// environment, no selector may name another.
func targetsAgree(data Object) error {
	targets, ok := data["targets"].(Object)
	if !ok {
		return nil
	}
	env, ok := targets["env"].(string)
	if !ok {
		return nil
	}
	selectors, _ := targets["selectors"].([]any)
	for _, s := range selectors {
		sel, _ := s.(Object)
		if other, ok := sel["env"].(string); ok && other != env {
			return fmt.Errorf("targets: selector env=%s contradicts the key's environment %s", other, env)
		}
	}
	return nil
}

// ReplayGuard keeps the last accepted seq per partition: an event is new only above it.
type ReplayGuard struct {
	last map[int32]int64
}

func NewReplayGuard() *ReplayGuard { return &ReplayGuard{last: map[int32]int64{}} }

// Check refuses a seq that is not above the last one accepted on the partition.
func (g *ReplayGuard) Check(partition int32, seq int64) *Rejection {
	if last, ok := g.last[partition]; ok && seq <= last {
		return reject("replayed", "seq %d is not newer than %d already applied (%d)", seq, last, partition)
	}
	return nil
}

// Accept records seq as applied on the partition.
func (g *ReplayGuard) Accept(partition int32, seq int64) {
	if last, ok := g.last[partition]; !ok || seq > last {
		g.last[partition] = seq
	}
}

// Last is the last accepted seq on the partition, if any.
func (g *ReplayGuard) Last(partition int32) (int64, bool) {
	last, ok := g.last[partition]
	return last, ok
}
