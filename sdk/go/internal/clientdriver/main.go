// Command clientdriver lets the repository's tests drive this client against a real cluster one
// step at a time: it connects to the scheduler at its first argument, then reads one JSON
// command per line on stdin and answers each with one JSON line on stdout.
//
//	clientdriver ADDRESS [default|on|off]   (the client's DirectKvs option)
//
// Security settings come from the environment (CLOUDBURST_TOKEN, CLOUDBURST_TLS_*), as the client
// reads them.
//
// Commands: {"op": "put", "key": K, "value": V}, {"op": "get", "key": K}, {"op": "delete", "key": K},
// {"op": "call", "name": FUNCTION, "args": [...]}, {"op": "delete_function", "name": FUNCTION},
// {"op": "kvs_address"} and {"op": "wait_result", "key": K, "timeout": SECONDS}. An answer is
// {"ok": true, ...} or {"ok": false, "code": "Unavailable", "reason": "...", "message": "..."}.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/status"

	"cloudburst-grpc/sdk/go/cloudburst"
	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

type command struct {
	Op      string  `json:"op"`
	Key     string  `json:"key"`
	Value   any     `json:"value"`
	Name    string  `json:"name"`
	Args    []any   `json:"args"`
	Timeout float64 `json:"timeout"`
}

func main() {
	if len(os.Args) < 2 || len(os.Args) > 3 {
		fmt.Fprintln(os.Stderr, "usage: clientdriver ADDRESS [default|on|off]")
		os.Exit(2)
	}
	modes := map[string]cloudburst.DirectKvs{
		"default": cloudburst.DirectKvsDefault,
		"on":      cloudburst.DirectKvsOn,
		"off":     cloudburst.DirectKvsOff,
	}
	mode := cloudburst.DirectKvsDefault
	if len(os.Args) == 3 {
		var ok bool
		if mode, ok = modes[os.Args[2]]; !ok {
			fmt.Fprintf(os.Stderr, "clientdriver: unknown mode %q\n", os.Args[2])
			os.Exit(2)
		}
	}
	client, err := cloudburst.DialWithOptions(os.Args[1], cloudburst.Options{DirectKvs: mode})
	if err != nil {
		fmt.Fprintln(os.Stderr, "clientdriver:", err)
		os.Exit(1)
	}
	defer client.Close()
	out := json.NewEncoder(os.Stdout)
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		var cmd command
		if err := json.Unmarshal(lines.Bytes(), &cmd); err != nil {
			fmt.Fprintln(os.Stderr, "clientdriver: a malformed command:", err)
			os.Exit(2)
		}
		if err := out.Encode(run(client, cmd)); err != nil {
			os.Exit(1)
		}
	}
}

func run(client *cloudburst.Client, cmd command) map[string]any {
	timeout := 60 * time.Second
	if cmd.Timeout > 0 {
		timeout = time.Duration(cmd.Timeout * float64(time.Second))
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	switch cmd.Op {
	case "put":
		if err := client.Put(ctx, cmd.Key, cmd.Value); err != nil {
			return failed(err)
		}
		return map[string]any{"ok": true}
	case "get":
		result, found, err := client.Get(ctx, cmd.Key)
		if err != nil {
			return failed(err)
		}
		answer := map[string]any{"ok": true, "found": found}
		if found {
			value, err := result.Any()
			if err != nil {
				return failed(err)
			}
			answer["value"] = value
		}
		return answer
	case "delete":
		existed, err := client.Delete(ctx, cmd.Key)
		if err != nil {
			return failed(err)
		}
		return map[string]any{"ok": true, "existed": existed}
	case "call":
		result, err := client.CallFunction(ctx, cmd.Name, cmd.Args...)
		if err != nil {
			return failed(err)
		}
		value, err := result.Any()
		if err != nil {
			return failed(err)
		}
		return map[string]any{"ok": true, "value": value}
	case "delete_function":
		_, err := client.Scheduler.DeleteFunction(ctx, &cloudburstv1.DeleteFunctionRequest{Name: cmd.Name})
		if err != nil {
			return failed(err)
		}
		return map[string]any{"ok": true}
	case "kvs_address":
		return map[string]any{"ok": true, "address": client.KvsAddress()}
	case "wait_result":
		result, err := client.WaitResult(ctx, cmd.Key, false)
		if err != nil {
			return failed(err)
		}
		value, err := result.Any()
		if err != nil {
			return failed(err)
		}
		return map[string]any{"ok": true, "value": value}
	}
	return map[string]any{"ok": false, "message": fmt.Sprintf("unknown op %q", cmd.Op)}
}

func failed(err error) map[string]any {
	var typed *cloudburst.Error
	if errors.As(err, &typed) {
		return map[string]any{"ok": false, "code": typed.Code.String(), "reason": typed.Reason, "message": typed.Message}
	}
	if st, ok := status.FromError(err); ok { // an error of a generated stub
		return map[string]any{"ok": false, "code": st.Code().String(), "reason": "", "message": st.Message()}
	}
	return map[string]any{"ok": false, "code": "", "message": err.Error()}
}
