// Command polyglot calls a DAG registered from Python, reads a stored result, writes and reads a
// KVS value and checks the typed error of an unknown DAG, against the scheduler at the address
// given as its first argument. It prints one JSON object with what it saw and exits non-zero at
// the first check that fails. The repository's tests run it against `cbgrpc serve`.
//
//	go run ./examples/polyglot 127.0.0.1:7600 poly_pipeline
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"time"

	"cloudburst-grpc/sdk/go/cloudburst"
)

type summary struct {
	Direct      map[string]any `json:"direct"`
	StoredKey   string         `json:"stored_key"`
	Stored      map[string]any `json:"stored"`
	KvsKey      string         `json:"kvs_key"`
	KvsValue    any            `json:"kvs_value"`
	UnknownDag  string         `json:"unknown_dag_reason"`
	Unencodable string         `json:"unencodable_reason"`
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: polyglot ADDRESS DAG")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "polyglot:", err)
		os.Exit(1)
	}
}

func run(address, dag string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client, err := cloudburst.Dial(address)
	if err != nil {
		return err
	}
	defer client.Close()
	var out summary
	args := map[string][]any{"poly_total": {map[string]any{"label": "go", "items": []int{1, 2, 3}}}}
	want := map[string]any{"label": "go", "total": 6.0, "count": 3.0, "language": "python"}

	// A DAG call with JSON arguments, answered directly.
	result, err := client.CallDag(ctx, dag, args)
	if err != nil {
		return fmt.Errorf("direct CallDag: %w", err)
	}
	if err := result.Decode(&out.Direct); err != nil {
		return err
	}
	if !reflect.DeepEqual(out.Direct, want) {
		return fmt.Errorf("direct CallDag returned %v, want %v", out.Direct, want)
	}

	// The same call stored, then read (and released) by its response key.
	out.StoredKey, err = client.StartDag(ctx, dag, args)
	if err != nil {
		return fmt.Errorf("stored CallDag: %w", err)
	}
	result, err = client.WaitResult(ctx, out.StoredKey, true)
	if err != nil {
		return fmt.Errorf("WaitResult: %w", err)
	}
	if err := result.Decode(&out.Stored); err != nil {
		return err
	}
	if !reflect.DeepEqual(out.Stored, want) {
		return fmt.Errorf("the stored result was %v, want %v", out.Stored, want)
	}

	// A KVS value written here and read back.
	out.KvsKey = "polyglot-go"
	written := map[string]any{"from": "go", "list": []any{1.0, "two", nil, true}}
	if err := client.Put(ctx, out.KvsKey, written); err != nil {
		return fmt.Errorf("Put: %w", err)
	}
	stored, found, err := client.Get(ctx, out.KvsKey)
	if err != nil || !found {
		return fmt.Errorf("Get: found=%v err=%v", found, err)
	}
	if err := stored.Decode(&out.KvsValue); err != nil {
		return err
	}
	if !reflect.DeepEqual(out.KvsValue, written) {
		return fmt.Errorf("Get returned %v, want %v", out.KvsValue, written)
	}

	// An unknown DAG is a typed error with its reason.
	_, err = client.CallDag(ctx, "no-such-dag", nil)
	var typed *cloudburst.Error
	if !errors.As(err, &typed) || typed.Reason != cloudburst.ReasonDagNotFound {
		return fmt.Errorf("an unknown DAG gave %v, want a %s error", err, cloudburst.ReasonDagNotFound)
	}
	out.UnknownDag = typed.Reason

	// A result JSON cannot carry is a typed error too, not a pickle.
	_, err = client.CallFunction(ctx, "poly_set")
	out.Unencodable = cloudburst.ReasonOf(err)
	if out.Unencodable != cloudburst.ReasonSerializationFailed {
		return fmt.Errorf("a set result gave %v, want a %s error", err, cloudburst.ReasonSerializationFailed)
	}

	return json.NewEncoder(os.Stdout).Encode(out)
}
