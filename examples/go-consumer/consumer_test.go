package main

// `go test` checks this consumer against the vectors published in the ckms repository, without
// Kafka; the repository's own test suite also runs it over a real broker beside the Python
// Subscriber.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"math"
	"os"
	"testing"
)

const vectorsDir = "../../docs/vectors/"

func TestConsumerVectors(t *testing.T) {
	schemas, err := LoadSchemas()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := judgeVectors(vectorsDir+"consumer.json", schemas, &out); err != nil {
		t.Fatal(err)
	}
	var file struct {
		Cases []struct {
			Name    string  `json:"name"`
			Verdict string  `json:"verdict"`
			Reason  *string `json:"reason"`
		} `json:"cases"`
	}
	raw, err := os.ReadFile(vectorsDir + "consumer.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(&out)
	for _, want := range file.Cases {
		var got struct {
			Name    string  `json:"name"`
			Verdict string  `json:"verdict"`
			Reason  *string `json:"reason"`
		}
		if err := dec.Decode(&got); err != nil {
			t.Fatalf("%s: %v", want.Name, err)
		}
		if got.Name != want.Name || got.Verdict != want.Verdict || str(got.Reason) != str(want.Reason) {
			t.Errorf("%s: got %s %s, want %s %s", want.Name, got.Verdict, str(got.Reason), want.Verdict, str(want.Reason))
		}
	}
}

func str(p *string) string {
	if p == nil {
		return "-"
	}
	return *p
}

func TestCanonicalVectors(t *testing.T) {
	raw, err := os.ReadFile(vectorsDir + "canonical_json.json")
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Valid []struct {
			Name        string `json:"name"`
			ExpectedHex string `json:"expected_hex"`
		} `json:"valid"`
		Invalid []struct {
			Name     string `json:"name"`
			InputHex string `json:"input_hex"`
		} `json:"invalid"`
	}
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	for _, v := range file.Valid {
		data, _ := hex.DecodeString(v.ExpectedHex)
		if _, err := ParseCanonical(data); err != nil {
			t.Errorf("%s: refused: %v", v.Name, err)
		}
	}
	for _, v := range file.Invalid {
		data, _ := hex.DecodeString(v.InputHex)
		if _, err := ParseCanonical(data); err == nil {
			t.Errorf("%s: accepted", v.Name)
		}
	}
}

func TestPythonFloat(t *testing.T) {
	for f, want := range map[float64]string{
		0: "0.0", math.Copysign(0, -1): "-0.0", 1: "1.0", 0.1: "0.1", 1e16: "1e+16",
		1e15: "1000000000000000.0", 1e-4: "0.0001", 1e-5: "1e-05", 5e-324: "5e-324",
		-2.5e-7: "-2.5e-07", 123.456: "123.456", 1.7976931348623157e308: "1.7976931348623157e+308",
	} {
		if got := pythonFloat(f); got != want {
			t.Errorf("pythonFloat(%v) = %s, want %s", f, got, want)
		}
	}
}

func TestKeyID(t *testing.T) {
	public, _ := hex.DecodeString("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
	if got := KeyID(public); got != "ed25519:If4x36FUomFia_hUBG_SJw" {
		t.Errorf("KeyID = %s", got)
	}
}
