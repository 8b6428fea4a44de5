package main

// The consumer's position, kept in a small JSON file in the same format as the Python
// FileOffsetStore ({"<topic>": {"<partition>": {"offset": N, "last_seq": S}}}), replaced
// atomically: temp file in the same directory, fsync, rename, fsync the directory.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
)

// Position is where a partition stands: the next offset to read and the last seq applied.
type Position struct {
	Offset  int64  `json:"offset"`
	LastSeq *int64 `json:"last_seq"`
}

// StateFile keeps positions by topic and partition.
type StateFile struct {
	Path string
}

func (s StateFile) read() (map[string]map[string]Position, error) {
	data, err := os.ReadFile(s.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]map[string]Position{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state file %s is unreadable: %w", s.Path, err)
	}
	var all map[string]map[string]Position
	if err := json.Unmarshal(data, &all); err != nil || all == nil {
		return nil, fmt.Errorf("state file %s is not a JSON object of positions", s.Path)
	}
	return all, nil
}

// Load returns the saved positions of topic by partition.
func (s StateFile) Load(topic string) (map[int32]Position, error) {
	all, err := s.read()
	if err != nil {
		return nil, err
	}
	out := map[int32]Position{}
	for p, pos := range all[topic] {
		n, err := strconv.ParseInt(p, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("state file %s has a bad partition %q", s.Path, p)
		}
		out[int32(n)] = pos
	}
	return out, nil
}

// Save durably replaces the positions of topic, keeping other topics' entries.
func (s StateFile) Save(topic string, positions map[int32]Position) error {
	all, err := s.read()
	if err != nil {
		return err
	}
	entry := map[string]Position{}
	for p, pos := range positions {
		entry[strconv.Itoa(int(p))] = pos
	}
	all[topic] = entry
	data, err := json.Marshal(all)
	if err != nil {
		return err
	}
	dir := filepath.Dir(s.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(s.Path)+".")
	if err != nil {
		return fmt.Errorf("cannot save positions to %s: %w", s.Path, err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if _, err := tmp.Write(data); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), s.Path)
	}
	if err != nil {
		return fmt.Errorf("cannot save positions to %s: %w", s.Path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
