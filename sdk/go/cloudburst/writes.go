package cloudburst

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"time"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// lwwClock makes the last-writer-wins timestamps of a client's writes, as the Python SDK's
// LwwClock does: wall-clock nanoseconds order writes across writers, a per-writer step keeps them
// strictly increasing when the clock stands still or steps back, and the writer id breaks ties.
type lwwClock struct {
	writer string
	mu     sync.Mutex
	last   uint64
}

func newLwwClock() *lwwClock {
	var id [8]byte
	_, _ = rand.Read(id[:]) // crypto/rand.Read does not fail
	return &lwwClock{writer: fmt.Sprintf("%s-%d", hex.EncodeToString(id[:]), os.Getpid())}
}

// now is a timestamp greater than every one the clock made before.
func (c *lwwClock) now() *cloudburstv1.LwwTimestamp {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.last = max(uint64(time.Now().UnixNano()), c.last+1)
	return &cloudburstv1.LwwTimestamp{TimeNs: c.last, WriterId: c.writer}
}

// newRequestID is a random id for one write or delete, sent with each of its attempts.
func newRequestID() string {
	return rand.Text()
}
