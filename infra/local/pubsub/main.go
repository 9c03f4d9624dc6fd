// The Pub/Sub emulator of the local platform: Google's pstest fake (the in-memory Pub/Sub
// server its Go client tests against) served over gRPC on a chosen address. Clients reach it
// through PUBSUB_EMULATOR_HOST. pstest keeps subscriptions' ordering, ack deadlines,
// dead-letter policies and delivery attempts; it does not push, so the local runtime pulls
// and posts like Pub/Sub's push agent (functions/microfl/local/push.py).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/v2/pstest"
)

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 8085, "port to listen on")
	flag.Parse()
	srv := pstest.NewServerWithAddress(fmt.Sprintf("%s:%d", *host, *port))
	fmt.Printf("pubsub emulator listening on %s\n", srv.Addr)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	srv.Close()
}
