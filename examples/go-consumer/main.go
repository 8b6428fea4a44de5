// Command ckms-go-consumer reacts to ckms revocations from a Go service: it reads the ckms
// events topic, verifies every record against the pinned controller key before parsing it,
// drops forgeries and replays with the same reasons as the Python Subscriber, keeps its
// position and last seq per partition in a file, and prints each revocation.
//
// The wire rules it follows are docs/events.md in the ckms repository.
package main

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// pin decodes a controller public key (base64 of the raw 32 bytes, as `ckms status --json`
// shows it) and returns it with its key id.
func pin(text string) (string, ed25519.PublicKey, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(text))
	if err != nil || len(raw) != ed25519.PublicKeySize {
		return "", nil, fmt.Errorf("-trust %q: expected the base64 of a 32-byte Ed25519 public key", text)
	}
	key := ed25519.PublicKey(raw)
	return KeyID(key), key, nil
}

// printer writes what the consumer sees: a line per revocation (or per event with -all), and
// with -json one JSON object per record, refused ones included.
type printer struct {
	mu     sync.Mutex
	out    io.Writer
	asJSON bool
	all    bool
}

func (p *printer) emit(line any) {
	data, _ := json.Marshal(line)
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.out, string(data))
}

func canonicalText(v any) json.RawMessage {
	var b strings.Builder
	_ = encodeCanonical(&b, v)
	return json.RawMessage(b.String())
}

func (p *printer) Event(topic string, partition int32, offset int64, ev *Event) {
	if p.asJSON {
		p.emit(map[string]any{
			"verdict": "accept", "topic": topic, "partition": partition, "offset": offset,
			"type": ev.Type, "seq": ev.Seq, "id": ev.ID, "at": ev.At, "signer": ev.Signer,
			"data": canonicalText(ev.Data),
		})
		return
	}
	text := describe(ev)
	if (text == "" || ev.Type == "key.rotated") && !p.all {
		return
	}
	if text == "" {
		text = fmt.Sprintf("%s seq=%d", ev.Type, ev.Seq)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.out, text)
}

// describe is the line printed for a revocation, a rotation or the hosts' acks (one line per
// ack); empty for other events.
func describe(ev *Event) string {
	d := ev.Data
	str := func(k string) string { s, _ := d[k].(string); return s }
	num := func(k string) string {
		if n, ok := d[k].(Number); ok && n.IsInt {
			return n.Int.String()
		}
		return "-"
	}
	switch ev.Type {
	case "key.revoked":
		compromise, _ := d["compromise"].(bool)
		return fmt.Sprintf("REVOKED key=%s version=%s reason=%s compromise=%t seq=%d id=%s",
			str("key"), num("version"), str("reason"), compromise, ev.Seq, ev.ID)
	case "key.rotated":
		return fmt.Sprintf("ROTATED key=%s version=%s primary=%s seq=%d id=%s",
			str("key"), num("version"), num("primary"), ev.Seq, ev.ID)
	case "key.destroyed":
		return fmt.Sprintf("DESTROYED key=%s version=%s seq=%d id=%s", str("key"), num("version"), ev.Seq, ev.ID)
	case "host.revoked":
		return fmt.Sprintf("HOST-REVOKED host=%s signer_key_id=%s seq=%d id=%s",
			str("host"), str("signer_key_id"), ev.Seq, ev.ID)
	case "fleet.acked": // on the fleet topic (-topic ckms.fleet): hosts' acks, controller-signed
		acks, _ := d["acks"].([]any)
		lines := make([]string, 0, len(acks))
		for _, a := range acks {
			ack, _ := a.(map[string]any)
			field := func(k string) string {
				switch v := ack[k].(type) {
				case string:
					return v
				case Number:
					if v.IsInt {
						return v.Int.String()
					}
				}
				return "-"
			}
			lines = append(lines, fmt.Sprintf("ACKED key=%s host=%s version=%s status=%s at=%s seq=%d id=%s",
				str("key"), field("host"), field("version"), field("status"), field("at"), ev.Seq, ev.ID))
		}
		return strings.Join(lines, "\n")
	}
	return ""
}

func (p *printer) Dropped(topic string, partition int32, offset int64, r *Rejection) {
	log.Printf("dropped event topic=%s partition=%d offset=%d reason=%s: %s",
		topic, partition, offset, r.Reason, r.Detail)
	if p.asJSON {
		p.emit(map[string]any{
			"verdict": "reject", "topic": topic, "partition": partition, "offset": offset,
			"reason": r.Reason, "detail": r.Detail,
		})
	}
}

// vectorFile is docs/vectors/consumer.json.
type vectorFile struct {
	Trusted []struct {
		PublicHex string `json:"public_hex"`
	} `json:"trusted"`
	Cases []struct {
		Name      string     `json:"name"`
		Partition int32      `json:"partition"`
		ValueHex  *string    `json:"value_hex"`
		Headers   [][]string `json:"headers"`
	} `json:"cases"`
}

// judgeVectors applies the rules to the published vectors without Kafka and prints one JSON
// line per case: {"name", "verdict", "reason"}.
func judgeVectors(path string, schemas *Schemas, out io.Writer) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var vf vectorFile
	if err := json.Unmarshal(raw, &vf); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	v := &Verifier{Trust: map[string]ed25519.PublicKey{}, Schemas: schemas}
	for _, t := range vf.Trusted {
		key, err := hex.DecodeString(t.PublicHex)
		if err != nil || len(key) != ed25519.PublicKeySize {
			return fmt.Errorf("%s: bad trusted key", path)
		}
		v.Trust[KeyID(key)] = key
	}
	guard := NewReplayGuard()
	enc := json.NewEncoder(out)
	for _, c := range vf.Cases {
		var value []byte
		if c.ValueHex != nil {
			value, err = hex.DecodeString(*c.ValueHex)
			if err != nil {
				return fmt.Errorf("%s: %s: bad value_hex", path, c.Name)
			}
			if value == nil {
				value = []byte{}
			}
		}
		var headers []Header
		for _, h := range c.Headers {
			hv, err := hex.DecodeString(h[1])
			if err != nil {
				return fmt.Errorf("%s: %s: bad header", path, c.Name)
			}
			if hv == nil {
				hv = []byte{}
			}
			headers = append(headers, Header{Key: h[0], Value: hv})
		}
		ev, rej := v.Verify(value, headers)
		if rej == nil {
			rej = guard.Check(c.Partition, ev.Seq)
		}
		line := map[string]any{"name": c.Name, "verdict": "accept", "reason": nil}
		if rej != nil {
			line["verdict"], line["reason"] = "reject", rej.Reason
		} else {
			guard.Accept(c.Partition, ev.Seq)
		}
		if err := enc.Encode(line); err != nil {
			return err
		}
	}
	return nil
}

// checkCanonical reads hex-encoded values, one per line, and prints "canonical" or "refused"
// for each: the canonical JSON rules alone, for cross-checking an implementation.
func checkCanonical(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		value, err := hex.DecodeString(strings.TrimSpace(line))
		if err != nil {
			return fmt.Errorf("bad hex line %q", line)
		}
		verdict := "canonical"
		if _, err := ParseCanonical(value); err != nil {
			verdict = "refused"
		}
		fmt.Fprintln(out, verdict)
	}
	return nil
}

func main() {
	log.SetFlags(log.LstdFlags | log.LUTC)
	var trust, types listFlag
	brokers := flag.String("brokers", "localhost:9092", "Kafka bootstrap servers, comma-separated")
	topic := flag.String("topic", "ckms.events", "the ckms events topic")
	flag.Var(&trust, "trust", "controller signing public key, base64 (repeat to trust several, e.g. across a key rotation)")
	state := flag.String("state", "", "file keeping the position and last seq per partition (required)")
	start := flag.String("start", "earliest", "where to begin on a partition without a saved position: earliest or latest")
	flag.Var(&types, "type", "event type to print (repeatable; default: all)")
	minSeq := flag.Int64("min-seq", 0, "drop every event at or below this seq on all partitions")
	pollWait := flag.Duration("poll-wait", 5*time.Second, "long poll: how long the broker may hold a fetch (idle cost, not latency)")
	asJSON := flag.Bool("json", false, "print one JSON object per record (refusals included) instead of text")
	all := flag.Bool("all", false, "in text mode, print every event, not only revocations (implied by -type)")
	vectors := flag.String("vectors", "", "judge the records of a consumer vector file (docs/vectors/consumer.json) and exit")
	canonical := flag.Bool("check-canonical", false, "read hex values from stdin, one per line, and say whether each is canonical JSON")
	var tlsFiles TLSFiles
	flag.StringVar(&tlsFiles.CA, "tls-ca", "", "PEM CA bundle for brokers that require TLS")
	flag.StringVar(&tlsFiles.Cert, "tls-cert", "", "PEM client certificate (mutual TLS)")
	flag.StringVar(&tlsFiles.Key, "tls-key", "", "PEM client key (mutual TLS)")
	flag.Parse()

	schemas, err := LoadSchemas()
	if err != nil {
		log.Fatalf("cannot load the event schemas: %v", err)
	}
	if *canonical {
		if err := checkCanonical(os.Stdin, os.Stdout); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *vectors != "" {
		if err := judgeVectors(*vectors, schemas, os.Stdout); err != nil {
			log.Fatal(err)
		}
		return
	}
	if len(trust) == 0 || *state == "" {
		log.Fatal("-trust and -state are required (see -help)")
	}
	if *start != "earliest" && *start != "latest" {
		log.Fatal("-start must be earliest or latest")
	}
	v := &Verifier{Trust: map[string]ed25519.PublicKey{}, Schemas: schemas}
	for _, t := range trust {
		kid, key, err := pin(t)
		if err != nil {
			log.Fatal(err)
		}
		v.Trust[kid] = key
	}
	cfg := Config{
		Brokers:  strings.Split(*brokers, ","),
		Topic:    *topic,
		State:    StateFile{Path: *state},
		Start:    *start,
		MinSeq:   *minSeq,
		PollWait: *pollWait,
		TLS:      tlsFiles,
	}
	if len(types) > 0 {
		cfg.Types = map[string]bool{}
		for _, t := range types {
			if !schemas.Known(t) {
				log.Fatalf("-type %s: unknown event type", t)
			}
			cfg.Types[t] = true
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Types asked for by name are printed whatever they are.
	out := &printer{out: os.Stdout, asJSON: *asJSON, all: *all || len(types) > 0}
	if err := Run(ctx, cfg, v, out); err != nil && !errors.Is(err, context.Canceled) {
		log.Fatal(err)
	}
}
