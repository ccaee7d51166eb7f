// libcni-driver: a stand-in for cnitool, built from Debian's libcni sources by the tests.
//
// It drives a CNI network configuration list through libcni, the library containerd and
// cri-o use, so chaining, prevResult, the result cache and capability arguments are handled
// by third-party code, not by weavepy's tests.
//
// Usage: libcni-driver add|check|del|validate CONFLIST NETNS CONTAINER_ID [IFNAME]
// Environment: CNI_PATH (plugin directories, ':'-separated), CNI_CACHE_DIR (result cache),
// CAP_ARGS (JSON object of capability arguments), DRIVER_CNI_ARGS ("K=V;K=V").
// On success ADD prints the final result as JSON; any error is printed to stderr with exit 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 5 {
		fail("usage: %s add|check|del|validate CONFLIST NETNS CONTAINER_ID [IFNAME]", filepath.Base(os.Args[0]))
	}
	action, listPath, netns, containerID := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	ifname := "eth0"
	if len(os.Args) > 5 {
		ifname = os.Args[5]
	}

	list, err := libcni.ConfListFromFile(listPath)
	if err != nil {
		fail("loading %s: %v", listPath, err)
	}

	runtime := &libcni.RuntimeConf{
		ContainerID: containerID,
		NetNS:       netns,
		IfName:      ifname,
		CacheDir:    os.Getenv("CNI_CACHE_DIR"),
	}
	if raw := os.Getenv("CAP_ARGS"); raw != "" {
		if err := json.Unmarshal([]byte(raw), &runtime.CapabilityArgs); err != nil {
			fail("CAP_ARGS is not a JSON object: %v", err)
		}
	}
	for _, pair := range strings.Split(os.Getenv("DRIVER_CNI_ARGS"), ";") {
		if key, value, found := strings.Cut(pair, "="); found {
			runtime.Args = append(runtime.Args, [2]string{key, value})
		}
	}

	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), runtime.CacheDir, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	switch action {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, runtime)
		if err != nil {
			fail("ADD: %v", err)
		}
		if err := result.Print(); err != nil {
			fail("printing the result: %v", err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, runtime); err != nil {
			fail("CHECK: %v", err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, runtime); err != nil {
			fail("DEL: %v", err)
		}
	case "validate":
		caps, err := cni.ValidateNetworkList(ctx, list)
		if err != nil {
			fail("VALIDATE: %v", err)
		}
		fmt.Println(strings.Join(caps, ","))
	default:
		fail("unknown action %q", action)
	}
}
