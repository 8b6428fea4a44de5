package main

// Reading ckms.events with franz-go: every partition assigned directly (no consumer group, so
// any number of services can listen without coordinating), each from its saved offset.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log"
	"os"
	"sort"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Config is what the consumer needs to run.
type Config struct {
	Brokers  []string
	Topic    string
	State    StateFile
	Start    string // "earliest" or "latest", for partitions without a saved position
	Types    map[string]bool
	MinSeq   int64
	PollWait time.Duration
	TLS      TLSFiles
}

// TLSFiles names the PEM files of a TLS connection to the brokers. All empty means plaintext.
type TLSFiles struct {
	CA, Cert, Key string
}

// tlsConfig is the hook for brokers that require TLS (mutual TLS with a client certificate
// when Cert and Key are given); nil means plaintext.
func tlsConfig(files TLSFiles) (*tls.Config, error) {
	if files == (TLSFiles{}) {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if files.CA != "" {
		pem, err := os.ReadFile(files.CA)
		if err != nil {
			return nil, fmt.Errorf("TLS CA: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS CA %s holds no PEM certificate", files.CA)
		}
	}
	if (files.Cert == "") != (files.Key == "") {
		return nil, errors.New("TLS client certificate and key go together")
	}
	if files.Cert != "" {
		pair, err := tls.LoadX509KeyPair(files.Cert, files.Key)
		if err != nil {
			return nil, fmt.Errorf("TLS client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// Handler receives each verified event (after the replay check) and each refusal.
type Handler interface {
	Event(topic string, partition int32, offset int64, ev *Event)
	Dropped(topic string, partition int32, offset int64, r *Rejection)
}

func partitionsOf(ctx context.Context, cl *kgo.Client, topic string) ([]int32, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		req := kmsg.NewPtrMetadataRequest()
		t := kmsg.NewMetadataRequestTopic()
		t.Topic = kmsg.StringPtr(topic)
		req.Topics = append(req.Topics, t)
		resp, err := req.RequestWith(ctx, cl)
		if err == nil && len(resp.Topics) == 1 {
			if err = kerr.ErrorForCode(resp.Topics[0].ErrorCode); err == nil && len(resp.Topics[0].Partitions) > 0 {
				var out []int32
				for _, p := range resp.Topics[0].Partitions {
					out = append(out, p.Partition)
				}
				sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
				return out, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("topic %s does not exist or has no partitions: %v", topic, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Run consumes until ctx ends, then saves the positions and returns.
func Run(ctx context.Context, cfg Config, v *Verifier, h Handler) error {
	tlsCfg, err := tlsConfig(cfg.TLS)
	if err != nil {
		return err
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ClientID("ckms-go-consumer"),
		kgo.FetchMaxWait(cfg.PollWait),
		// The controller publishes in Kafka transactions: an aborted one's records are not
		// events (docs/events.md section 8).
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// Larger than the message bound, so an oversized record is fetched and dropped
		// instead of blocking its partition.
		kgo.FetchMaxPartitionBytes(1 << 20),
	}
	if tlsCfg != nil {
		opts = append(opts, kgo.DialTLSConfig(tlsCfg))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return err
	}
	defer cl.Close()

	partitions, err := partitionsOf(ctx, cl, cfg.Topic)
	if err != nil {
		return err
	}
	saved, err := cfg.State.Load(cfg.Topic)
	if err != nil {
		return err
	}
	guard := NewReplayGuard()
	positions := map[int32]Position{}
	assign := map[int32]kgo.Offset{}
	for _, p := range partitions {
		if pos, ok := saved[p]; ok {
			assign[p] = kgo.NewOffset().At(pos.Offset)
			positions[p] = pos
			if pos.LastSeq != nil {
				guard.Accept(p, *pos.LastSeq)
			}
		} else if cfg.Start == "latest" {
			assign[p] = kgo.NewOffset().AtEnd()
		} else {
			assign[p] = kgo.NewOffset().AtStart()
		}
		if cfg.MinSeq > 0 {
			guard.Accept(p, cfg.MinSeq) // seq is controller-wide: one floor for every partition
		}
	}
	cl.AddConsumePartitions(map[string]map[int32]kgo.Offset{cfg.Topic: assign})
	log.Printf("subscribed to %s partitions=%v", cfg.Topic, partitions)

	dirty := false
	advance := func(p int32, offset int64) {
		pos := Position{Offset: offset + 1}
		if last, ok := guard.Last(p); ok {
			pos.LastSeq = &last
		}
		positions[p] = pos
		dirty = true
	}
	save := func() error {
		if !dirty {
			return nil
		}
		dirty = false
		return cfg.State.Save(cfg.Topic, positions)
	}
	for {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return save()
		}
		failed := false
		fetches.EachError(func(topic string, p int32, err error) {
			failed = true
			log.Printf("fetch error topic=%s partition=%d: %v", topic, p, err)
		})
		if failed && fetches.NumRecords() == 0 {
			// The client retries by itself; do not spin on a broker that keeps failing.
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		fetches.EachRecord(func(r *kgo.Record) {
			headers := make([]Header, len(r.Headers))
			for i, hd := range r.Headers {
				headers[i] = Header{Key: hd.Key, Value: hd.Value}
			}
			ev, rej := v.Verify(r.Value, headers)
			if rej == nil {
				rej = guard.Check(r.Partition, ev.Seq)
			}
			if rej != nil {
				h.Dropped(r.Topic, r.Partition, r.Offset, rej)
				advance(r.Partition, r.Offset)
				return
			}
			guard.Accept(r.Partition, ev.Seq)
			if cfg.Types == nil || cfg.Types[ev.Type] {
				h.Event(r.Topic, r.Partition, r.Offset, ev)
			}
			advance(r.Partition, r.Offset)
		})
		// Handled events count once their batch's position is saved: after a crash, the
		// events since the last save come again (at least once).
		if err := save(); err != nil {
			return err
		}
	}
}
