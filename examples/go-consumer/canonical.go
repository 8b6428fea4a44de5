package main

// Canonical JSON as ckms signs it (docs/events.md, "Canonical JSON"): the value is parsed
// strictly, re-encoded by the canonical rules, and refused unless the bytes are identical.
// A value has exactly one encoding, so what the signature covers and what is read never differ.

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"sort"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

const (
	// MaxDepth is how many arrays and objects may nest in each other ({} is 1).
	MaxDepth = 32
	// maxIntDigits is the longest integer literal accepted (the reference implementation,
	// Python, refuses longer ones when parsing).
	maxIntDigits = 4300
)

// Number keeps a JSON number exactly: integers (literals without '.', 'e' or 'E') as big
// integers, everything else as float64.
type Number struct {
	IsInt bool
	Int   *big.Int
	Float float64
}

// Rat is the number's exact value (a float's exact binary value, as Python compares floats).
func (n Number) Rat() *big.Rat {
	if n.IsInt {
		return new(big.Rat).SetInt(n.Int)
	}
	return new(big.Rat).SetFloat64(n.Float)
}

// Object is a parsed JSON object; key order is not kept (the canonical order is sorted).
type Object map[string]any

var errNotCanonical = errors.New("JSON message is not in canonical form")

// ParseCanonical parses data and returns its value only if data is exactly its canonical
// encoding. Values are nil, bool, string, Number, []any and Object.
func ParseCanonical(data []byte) (any, error) {
	if !utf8.Valid(data) {
		return nil, errors.New("message is not valid UTF-8 JSON")
	}
	p := &parser{src: data}
	value, err := p.value(0)
	if err != nil {
		return nil, err
	}
	if p.pos != len(p.src) {
		return nil, errors.New("message is not valid UTF-8 JSON (trailing data)")
	}
	var out strings.Builder
	if err := encodeCanonical(&out, value); err != nil {
		return nil, err
	}
	if out.String() != string(data) {
		return nil, errNotCanonical
	}
	return value, nil
}

type parser struct {
	src []byte
	pos int
}

func (p *parser) fail(what string) error {
	return fmt.Errorf("message is not valid UTF-8 JSON (%s at byte %d)", what, p.pos)
}

func (p *parser) skipSpace() {
	for p.pos < len(p.src) {
		switch p.src[p.pos] {
		case ' ', '\t', '\n', '\r':
			p.pos++
		default:
			return
		}
	}
}

func (p *parser) value(depth int) (any, error) {
	p.skipSpace()
	if p.pos >= len(p.src) {
		return nil, p.fail("unexpected end")
	}
	var v any
	var err error
	switch c := p.src[p.pos]; {
	case c == '{' || c == '[':
		if depth+1 > MaxDepth {
			return nil, fmt.Errorf("JSON message is nested deeper than %d", MaxDepth)
		}
		if c == '{' {
			v, err = p.object(depth + 1)
		} else {
			v, err = p.array(depth + 1)
		}
	case c == '"':
		v, err = p.str()
	case c == 't':
		v, err = p.literal("true", true)
	case c == 'f':
		v, err = p.literal("false", false)
	case c == 'n':
		v, err = p.literal("null", nil)
	case c == 'N' || c == 'I':
		return nil, errors.New("NaN and Infinity are not allowed in canonical JSON")
	default:
		v, err = p.number()
	}
	if err != nil {
		return nil, err
	}
	p.skipSpace()
	return v, nil
}

func (p *parser) literal(word string, v any) (any, error) {
	if !strings.HasPrefix(string(p.src[p.pos:]), word) {
		return nil, p.fail("bad literal")
	}
	p.pos += len(word)
	return v, nil
}

func (p *parser) object(depth int) (any, error) {
	p.pos++ // {
	obj := Object{}
	p.skipSpace()
	if p.pos < len(p.src) && p.src[p.pos] == '}' {
		p.pos++
		return obj, nil
	}
	for {
		p.skipSpace()
		if p.pos >= len(p.src) || p.src[p.pos] != '"' {
			return nil, p.fail("expected a key")
		}
		key, err := p.str()
		if err != nil {
			return nil, err
		}
		p.skipSpace()
		if p.pos >= len(p.src) || p.src[p.pos] != ':' {
			return nil, p.fail("expected ':'")
		}
		p.pos++
		value, err := p.value(depth)
		if err != nil {
			return nil, err
		}
		if _, dup := obj[key]; dup {
			return nil, errors.New("duplicate key in JSON object")
		}
		obj[key] = value
		if p.pos >= len(p.src) {
			return nil, p.fail("unexpected end")
		}
		switch p.src[p.pos] {
		case ',':
			p.pos++
		case '}':
			p.pos++
			return obj, nil
		default:
			return nil, p.fail("expected ',' or '}'")
		}
	}
}

func (p *parser) array(depth int) (any, error) {
	p.pos++ // [
	arr := []any{}
	p.skipSpace()
	if p.pos < len(p.src) && p.src[p.pos] == ']' {
		p.pos++
		return arr, nil
	}
	for {
		value, err := p.value(depth)
		if err != nil {
			return nil, err
		}
		arr = append(arr, value)
		if p.pos >= len(p.src) {
			return nil, p.fail("unexpected end")
		}
		switch p.src[p.pos] {
		case ',':
			p.pos++
		case ']':
			p.pos++
			return arr, nil
		default:
			return nil, p.fail("expected ',' or ']'")
		}
	}
}

func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	v, err := strconv.ParseUint(string(b[:4]), 16, 32)
	return rune(v), err == nil
}

func (p *parser) str() (string, error) {
	p.pos++ // opening quote
	var out strings.Builder
	for {
		if p.pos >= len(p.src) {
			return "", p.fail("unterminated string")
		}
		c := p.src[p.pos]
		switch {
		case c == '"':
			p.pos++
			return out.String(), nil
		case c < 0x20:
			return "", p.fail("control character in string")
		case c != '\\':
			out.WriteByte(c)
			p.pos++
			continue
		}
		p.pos++ // backslash
		if p.pos >= len(p.src) {
			return "", p.fail("unterminated escape")
		}
		e := p.src[p.pos]
		p.pos++
		switch e {
		case '"', '\\', '/':
			out.WriteByte(e)
		case 'b':
			out.WriteByte('\b')
		case 'f':
			out.WriteByte('\f')
		case 'n':
			out.WriteByte('\n')
		case 'r':
			out.WriteByte('\r')
		case 't':
			out.WriteByte('\t')
		case 'u':
			r, ok := hex4(p.src[p.pos:])
			if !ok {
				return "", p.fail("bad \\u escape")
			}
			p.pos += 4
			if utf16.IsSurrogate(r) {
				// Only a high surrogate followed by an escaped low one is a character; a lone
				// surrogate cannot be encoded (Python refuses it when re-encoding).
				if r >= 0xDC00 || p.pos+6 > len(p.src) || p.src[p.pos] != '\\' || p.src[p.pos+1] != 'u' {
					return "", errors.New("cannot encode value as canonical JSON (lone surrogate)")
				}
				low, ok := hex4(p.src[p.pos+2:])
				if !ok || low < 0xDC00 || low > 0xDFFF {
					return "", errors.New("cannot encode value as canonical JSON (lone surrogate)")
				}
				p.pos += 6
				r = utf16.DecodeRune(r, low)
			}
			out.WriteRune(r)
		default:
			return "", p.fail("bad escape")
		}
	}
}

func (p *parser) number() (any, error) {
	start := p.pos
	isInt := true
	if p.pos < len(p.src) && p.src[p.pos] == '-' {
		p.pos++
	}
	digits := func() int {
		n := 0
		for p.pos < len(p.src) && p.src[p.pos] >= '0' && p.src[p.pos] <= '9' {
			p.pos++
			n++
		}
		return n
	}
	intStart := p.pos
	n := digits()
	if n == 0 || (n > 1 && p.src[intStart] == '0') {
		return nil, p.fail("bad number")
	}
	if p.pos < len(p.src) && p.src[p.pos] == '.' {
		isInt = false
		p.pos++
		if digits() == 0 {
			return nil, p.fail("bad number")
		}
	}
	if p.pos < len(p.src) && (p.src[p.pos] == 'e' || p.src[p.pos] == 'E') {
		isInt = false
		p.pos++
		if p.pos < len(p.src) && (p.src[p.pos] == '+' || p.src[p.pos] == '-') {
			p.pos++
		}
		if digits() == 0 {
			return nil, p.fail("bad number")
		}
	}
	lit := string(p.src[start:p.pos])
	if isInt {
		if n > maxIntDigits {
			return nil, errors.New("message is not valid UTF-8 JSON (integer too long)")
		}
		i, ok := new(big.Int).SetString(lit, 10)
		if !ok {
			return nil, p.fail("bad integer")
		}
		return Number{IsInt: true, Int: i}, nil
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil || math.IsInf(f, 0) {
		return nil, errors.New("cannot encode value as canonical JSON (float out of range)")
	}
	return Number{Float: f}, nil
}

func encodeCanonical(out *strings.Builder, v any) error {
	switch x := v.(type) {
	case nil:
		out.WriteString("null")
	case bool:
		if x {
			out.WriteString("true")
		} else {
			out.WriteString("false")
		}
	case string:
		encodeString(out, x)
	case Number:
		if x.IsInt {
			out.WriteString(x.Int.String())
		} else {
			out.WriteString(pythonFloat(x.Float))
		}
	case []any:
		out.WriteByte('[')
		for i, item := range x {
			if i > 0 {
				out.WriteByte(',')
			}
			if err := encodeCanonical(out, item); err != nil {
				return err
			}
		}
		out.WriteByte(']')
	case Object:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys) // UTF-8 byte order is code point order
		out.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				out.WriteByte(',')
			}
			encodeString(out, k)
			out.WriteByte(':')
			if err := encodeCanonical(out, x[k]); err != nil {
				return err
			}
		}
		out.WriteByte('}')
	default:
		return fmt.Errorf("cannot encode %T as canonical JSON", v)
	}
	return nil
}

// encodeString writes s raw (UTF-8), escaping only '"', '\' and U+0000..U+001F: \b \f \n \r
// \t by their short forms, the others as \u00xx with lowercase hex.
func encodeString(out *strings.Builder, s string) {
	out.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case '"':
			out.WriteString(`\"`)
		case '\\':
			out.WriteString(`\\`)
		case '\b':
			out.WriteString(`\b`)
		case '\f':
			out.WriteString(`\f`)
		case '\n':
			out.WriteString(`\n`)
		case '\r':
			out.WriteString(`\r`)
		case '\t':
			out.WriteString(`\t`)
		default:
			if c < 0x20 {
				fmt.Fprintf(out, `\u%04x`, c)
			} else {
				out.WriteByte(c)
			}
		}
	}
	out.WriteByte('"')
}

// pythonFloat is Python's repr of a float: the shortest digits that round-trip, in plain
// notation when the decimal exponent is from -4 to 15 (always with a '.'), else d.ddde±XX.
func pythonFloat(f float64) string {
	if f == 0 {
		if math.Signbit(f) {
			return "-0.0"
		}
		return "0.0"
	}
	sign := ""
	if f < 0 {
		sign = "-"
		f = -f
	}
	sci := strconv.FormatFloat(f, 'e', -1, 64) // d.ddde±XX
	mantissa, expText, _ := strings.Cut(sci, "e")
	exp, _ := strconv.Atoi(expText)
	digits := strings.Replace(mantissa, ".", "", 1)
	if exp < -4 || exp > 15 {
		m := digits[:1]
		if len(digits) > 1 {
			m += "." + digits[1:]
		}
		expSign := "+"
		if exp < 0 {
			expSign = "-"
			exp = -exp
		}
		return fmt.Sprintf("%s%se%s%02d", sign, m, expSign, exp)
	}
	point := exp + 1 // digits before the decimal point
	switch {
	case point <= 0:
		return sign + "0." + strings.Repeat("0", -point) + digits
	case point >= len(digits):
		return sign + digits + strings.Repeat("0", point-len(digits)) + ".0"
	default:
		return sign + digits[:point] + "." + digits[point:]
	}
}
