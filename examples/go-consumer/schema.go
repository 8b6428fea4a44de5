package main

// A small JSON Schema (2020-12) validator for the schemas ckms publishes in docs/schemas/,
// embedded in this binary. It implements the keywords those schemas use and refuses to load a
// schema with any other, so a keyword added later can never be silently ignored. One deliberate
// difference from the JSON Schema specification, which docs/events.md prescribes: "integer"
// means an integer literal (3, never 3.0).

import (
	"bytes"
	"embed"
	"encoding/json"
	"fmt"
	"math/big"
	"regexp"
	"strings"
	"unicode/utf8"
)

//go:embed schemas/envelope.json
var schemaFiles embed.FS

// annotations are keywords that never change a verdict.
var annotations = map[string]bool{
	"$schema": true, "title": true, "description": true, "default": true, "examples": true,
	"deprecated": true,
}

var assertions = map[string]bool{
	"$ref": true, "$defs": true, "type": true, "enum": true, "const": true,
	"properties": true, "required": true, "additionalProperties": true, "propertyNames": true,
	"minProperties": true, "items": true, "prefixItems": true, "minItems": true, "maxItems": true,
	"minLength": true, "maxLength": true, "pattern": true, "minimum": true, "maximum": true,
	"exclusiveMinimum": true, "exclusiveMaximum": true, "multipleOf": true,
	"anyOf": true, "allOf": true, "oneOf": true, "not": true, "if": true, "then": true, "else": true,
}

// Schemas holds the data schema of each event type, read from envelope.json.
type Schemas struct {
	defs    map[string]any
	byType  map[string]any
	types   map[string]bool
	regexps map[string]*regexp.Regexp
}

// LoadSchemas reads the embedded envelope schema and checks every keyword it uses.
func LoadSchemas() (*Schemas, error) {
	raw, err := schemaFiles.ReadFile("schemas/envelope.json")
	if err != nil {
		return nil, err
	}
	var root map[string]any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // bounds stay exact (a float64 would round 2**63-1)
	if err := dec.Decode(&root); err != nil {
		return nil, fmt.Errorf("envelope schema: %w", err)
	}
	s := &Schemas{byType: map[string]any{}, types: map[string]bool{}, regexps: map[string]*regexp.Regexp{}}
	s.defs, _ = root["$defs"].(map[string]any)
	if err := s.check(root); err != nil {
		return nil, fmt.Errorf("envelope schema: %w", err)
	}
	// allOf: [{if: {properties: {type: {const: T}}}, then: {properties: {data: {$ref}}}}]
	all, _ := root["allOf"].([]any)
	for _, branch := range all {
		b, _ := branch.(map[string]any)
		etype := dig(b, "if", "properties", "type", "const")
		data := dig(b, "then", "properties", "data")
		name, ok := etype.(string)
		if !ok || data == nil {
			return nil, fmt.Errorf("envelope schema: unexpected allOf branch %v", branch)
		}
		s.byType[name] = data
		s.types[name] = true
	}
	if len(s.byType) == 0 {
		return nil, fmt.Errorf("envelope schema names no event types")
	}
	return s, nil
}

// Known reports whether the schemas describe event type t.
func (s *Schemas) Known(t string) bool { return s.types[t] }

func dig(node any, path ...string) any {
	for _, p := range path {
		m, ok := node.(map[string]any)
		if !ok {
			return nil
		}
		node = m[p]
	}
	return node
}

// check walks a schema: every keyword known, every pattern compiled.
func (s *Schemas) check(node any) error {
	switch n := node.(type) {
	case map[string]any:
		for k, v := range n {
			switch {
			case annotations[k]:
				continue
			case !assertions[k]:
				return fmt.Errorf("unsupported keyword %q", k)
			case k == "type":
				if _, ok := v.(string); !ok {
					return fmt.Errorf("type %v: only a single type name is supported", v)
				}
			case k == "$ref":
				if ref, _ := v.(string); !strings.HasPrefix(ref, "#/$defs/") {
					return fmt.Errorf("$ref %v: only #/$defs/ references are supported", v)
				}
			case k == "pattern":
				text, _ := v.(string)
				re, err := regexp.Compile(text)
				if err != nil {
					return fmt.Errorf("pattern %q: %w", text, err)
				}
				s.regexps[text] = re
			case k == "properties" || k == "$defs":
				props, _ := v.(map[string]any)
				for _, sub := range props {
					if err := s.check(sub); err != nil {
						return err
					}
				}
			case k == "enum" || k == "const" || k == "required":
				continue
			default:
				if err := s.check(v); err != nil {
					return err
				}
			}
		}
	case []any:
		for _, item := range n {
			if err := s.check(item); err != nil {
				return err
			}
		}
	}
	return nil
}

// ValidateData checks an event's data against the schema of its type.
func (s *Schemas) ValidateData(etype string, data any) error {
	schema, ok := s.byType[etype]
	if !ok {
		return fmt.Errorf("no schema for %s", etype)
	}
	return s.validate(schema, data, "data")
}

func (s *Schemas) validate(schema any, v any, at string) error {
	switch sc := schema.(type) {
	case bool:
		if !sc {
			return fmt.Errorf("%s: not allowed", at)
		}
		return nil
	case map[string]any:
		return s.validateObject(sc, v, at)
	}
	return fmt.Errorf("%s: bad schema", at)
}

func jsonType(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case Number:
		if x.IsInt {
			return "integer"
		}
		return "number"
	case []any:
		return "array"
	case Object:
		return "object"
	}
	return "unknown"
}

// schemaNumber reads a number written in a schema, exactly.
func schemaNumber(v any) *big.Rat {
	n, ok := v.(json.Number)
	if !ok {
		return nil
	}
	r, ok := new(big.Rat).SetString(n.String())
	if !ok {
		return nil
	}
	return r
}

// equal compares an instance with a value from a schema (enum, const).
func equal(v any, want any) bool {
	switch w := want.(type) {
	case nil:
		return v == nil
	case bool:
		b, ok := v.(bool)
		return ok && b == w
	case string:
		s, ok := v.(string)
		return ok && s == w
	case json.Number:
		n, ok := v.(Number)
		return ok && n.Rat().Cmp(schemaNumber(w)) == 0
	}
	return false // arrays and objects are not used in enum/const by these schemas
}

func (s *Schemas) validateObject(sc map[string]any, v any, at string) error {
	if ref, ok := sc["$ref"].(string); ok {
		name := strings.TrimPrefix(ref, "#/$defs/")
		target, ok := s.defs[name]
		if !ok {
			return fmt.Errorf("%s: unknown $ref %s", at, ref)
		}
		if err := s.validate(target, v, at); err != nil {
			return err
		}
	}
	if t, ok := sc["type"].(string); ok {
		got := jsonType(v)
		if got != t && !(t == "number" && got == "integer") {
			return fmt.Errorf("%s: expected %s, got %s", at, t, got)
		}
	}
	if enum, ok := sc["enum"].([]any); ok {
		found := false
		for _, e := range enum {
			if equal(v, e) {
				found = true
				break
			}
		}
		if !found {
			return fmt.Errorf("%s: not one of the allowed values", at)
		}
	}
	if c, ok := sc["const"]; ok && !equal(v, c) {
		return fmt.Errorf("%s: must be %v", at, c)
	}
	switch x := v.(type) {
	case string:
		if err := s.validateString(sc, x, at); err != nil {
			return err
		}
	case Number:
		if err := validateNumber(sc, x, at); err != nil {
			return err
		}
	case []any:
		if err := s.validateArray(sc, x, at); err != nil {
			return err
		}
	case Object:
		if err := s.validateProps(sc, x, at); err != nil {
			return err
		}
	}
	for _, key := range []string{"allOf", "anyOf", "oneOf"} {
		list, ok := sc[key].([]any)
		if !ok {
			continue
		}
		passed := 0
		var first error
		for _, sub := range list {
			if err := s.validate(sub, v, at); err == nil {
				passed++
			} else if first == nil {
				first = err
			}
		}
		switch {
		case key == "allOf" && passed != len(list):
			return first
		case key == "anyOf" && passed == 0:
			return first
		case key == "oneOf" && passed != 1:
			return fmt.Errorf("%s: must match exactly one schema", at)
		}
	}
	if not, ok := sc["not"]; ok && s.validate(not, v, at) == nil {
		return fmt.Errorf("%s: matches a schema it must not", at)
	}
	if cond, ok := sc["if"]; ok {
		branch := "else"
		if s.validate(cond, v, at) == nil {
			branch = "then"
		}
		if sub, ok := sc[branch]; ok {
			if err := s.validate(sub, v, at); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *Schemas) validateString(sc map[string]any, x string, at string) error {
	n := utf8.RuneCountInString(x) // lengths count code points
	if m := schemaNumber(sc["minLength"]); m != nil && big.NewRat(int64(n), 1).Cmp(m) < 0 {
		return fmt.Errorf("%s: too short", at)
	}
	if m := schemaNumber(sc["maxLength"]); m != nil && big.NewRat(int64(n), 1).Cmp(m) > 0 {
		return fmt.Errorf("%s: too long", at)
	}
	if p, ok := sc["pattern"].(string); ok && !s.regexps[p].MatchString(x) {
		return fmt.Errorf("%s: does not match %s", at, p)
	}
	return nil
}

func validateNumber(sc map[string]any, x Number, at string) error {
	r := x.Rat()
	if m := schemaNumber(sc["minimum"]); m != nil && r.Cmp(m) < 0 {
		return fmt.Errorf("%s: below the minimum", at)
	}
	if m := schemaNumber(sc["maximum"]); m != nil && r.Cmp(m) > 0 {
		return fmt.Errorf("%s: above the maximum", at)
	}
	if m := schemaNumber(sc["exclusiveMinimum"]); m != nil && r.Cmp(m) <= 0 {
		return fmt.Errorf("%s: not above the minimum", at)
	}
	if m := schemaNumber(sc["exclusiveMaximum"]); m != nil && r.Cmp(m) >= 0 {
		return fmt.Errorf("%s: not below the maximum", at)
	}
	if m := schemaNumber(sc["multipleOf"]); m != nil && m.Sign() != 0 {
		if !new(big.Rat).Quo(r, m).IsInt() {
			return fmt.Errorf("%s: not a multiple of %s", at, m.RatString())
		}
	}
	return nil
}

func (s *Schemas) validateArray(sc map[string]any, x []any, at string) error {
	if m := schemaNumber(sc["minItems"]); m != nil && big.NewRat(int64(len(x)), 1).Cmp(m) < 0 {
		return fmt.Errorf("%s: too few items", at)
	}
	if m := schemaNumber(sc["maxItems"]); m != nil && big.NewRat(int64(len(x)), 1).Cmp(m) > 0 {
		return fmt.Errorf("%s: too many items", at)
	}
	prefix, _ := sc["prefixItems"].([]any)
	for i, item := range x {
		where := fmt.Sprintf("%s[%d]", at, i)
		if i < len(prefix) {
			if err := s.validate(prefix[i], item, where); err != nil {
				return err
			}
			continue
		}
		if items, ok := sc["items"]; ok {
			if err := s.validate(items, item, where); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *Schemas) validateProps(sc map[string]any, x Object, at string) error {
	if m := schemaNumber(sc["minProperties"]); m != nil && big.NewRat(int64(len(x)), 1).Cmp(m) < 0 {
		return fmt.Errorf("%s: too few properties", at)
	}
	if req, ok := sc["required"].([]any); ok {
		for _, r := range req {
			if name, _ := r.(string); name != "" {
				if _, present := x[name]; !present {
					return fmt.Errorf("%s: %s is required", at, name)
				}
			}
		}
	}
	props, _ := sc["properties"].(map[string]any)
	for key, value := range x {
		where := at + "." + key
		if names, ok := sc["propertyNames"]; ok {
			if err := s.validate(names, key, where); err != nil {
				return err
			}
		}
		if sub, ok := props[key]; ok {
			if err := s.validate(sub, value, where); err != nil {
				return err
			}
			continue
		}
		if extra, ok := sc["additionalProperties"]; ok {
			if err := s.validate(extra, value, where); err != nil {
				return err
			}
		}
	}
	return nil
}
