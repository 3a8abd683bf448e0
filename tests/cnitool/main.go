// cnitool: a tiny libcni client for Ambit's tests. It drives a conflist through Debian's libcni
// exactly as a container runtime would.
//
//	cnitool add|check|del <network> <netns-path>
//
// Environment: NETCONFPATH (conflist dir), CNI_PATH, CNI_IFNAME (eth0), CNI_ARGS (K=V;...),
// CAP_ARGS (JSON capability args), CNI_CONTAINERID, CNI_CACHEDIR.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "cnitool: "+format+"\n", args...)
	os.Exit(1)
}

func getenv(key, fallback string) string {
	if v, ok := os.LookupEnv(key); ok && v != "" {
		return v
	}
	return fallback
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: cnitool add|check|del <network> <netns-path>")
	}
	op, network := os.Args[1], os.Args[2]
	netns, err := filepath.Abs(os.Args[3])
	if err != nil {
		fail("netns path: %v", err)
	}
	list, err := libcni.LoadConfList(getenv("NETCONFPATH", "/etc/cni/net.d"), network)
	if err != nil {
		fail("load %s: %v", network, err)
	}
	rt := &libcni.RuntimeConf{
		ContainerID: getenv("CNI_CONTAINERID", "c"+strings.ReplaceAll(filepath.Base(netns), "-", "")),
		NetNS:       netns,
		IfName:      getenv("CNI_IFNAME", "eth0"),
	}
	if s := os.Getenv("CNI_ARGS"); s != "" {
		for _, kv := range strings.Split(s, ";") {
			parts := strings.SplitN(kv, "=", 2)
			if len(parts) != 2 {
				fail("bad CNI_ARGS entry %q", kv)
			}
			rt.Args = append(rt.Args, [2]string{parts[0], parts[1]})
		}
	}
	if s := os.Getenv("CAP_ARGS"); s != "" {
		if err := json.Unmarshal([]byte(s), &rt.CapabilityArgs); err != nil {
			fail("CAP_ARGS: %v", err)
		}
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHEDIR"), nil)
	ctx := context.Background()
	switch op {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail("add: %v", err)
		}
		if err := res.Print(); err != nil {
			fail("print: %v", err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail("check: %v", err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail("del: %v", err)
		}
	default:
		fail("unknown operation %q", op)
	}
}
