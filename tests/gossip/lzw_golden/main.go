// Command main compresses payloads with Go's compress/lzw exactly as memberlist does
// (lzw.NewWriter with LSB bit order and a literal width of 8; Write, then Close), so that
// tests/gossip/golden/lzw_vectors.json can be regenerated from the real thing.
//
// Input on stdin: one hex-encoded payload per line (an empty line is an empty payload).
// Output on stdout: one hex-encoded compressed stream per input line, in the same order.
// tests/gossip/lzw_golden.py runs it with `go run`; it needs nothing beyond the standard
// library.
package main

import (
	"bufio"
	"bytes"
	"compress/lzw"
	"encoding/hex"
	"fmt"
	"os"
)

// memberlist's lzwLitWidth.
const literalWidth = 8

func compress(payload []byte) ([]byte, error) {
	var out bytes.Buffer
	writer := lzw.NewWriter(&out, lzw.LSB, literalWidth)
	if _, err := writer.Write(payload); err != nil {
		return nil, err
	}
	if err := writer.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "lzw_golden:", err)
	os.Exit(1)
}

func main() {
	lines := bufio.NewScanner(os.Stdin)
	lines.Buffer(make([]byte, 0, 1<<16), 1<<24)
	results := bufio.NewWriter(os.Stdout)
	for lines.Scan() {
		payload, err := hex.DecodeString(lines.Text())
		if err != nil {
			fail(err)
		}
		compressed, err := compress(payload)
		if err != nil {
			fail(err)
		}
		fmt.Fprintln(results, hex.EncodeToString(compressed))
	}
	if err := lines.Err(); err != nil {
		fail(err)
	}
	if err := results.Flush(); err != nil {
		fail(err)
	}
}
