// Command deviceplugin advertises fake GPUs to the local kubelet over the real
// device-plugin API (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1).
//
// The number of devices comes from a file holding one integer: whoever applies the
// node's sharing config writes it (physical GPUs x replicas), and the plugin sends
// the new device list to the kubelet within a poll interval. Devices carry no
// hardware: Allocate only sets NVIDIA_VISIBLE_DEVICES, as NVIDIA's plugin does.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	mu      sync.Mutex
	count   int
	changed chan struct{} // closed and replaced whenever count changes
}

func deviceIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("fake-gpu-%d", i)
	}
	return ids
}

func (p *plugin) set(n int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n == p.count {
		return false
	}
	p.count = n
	close(p.changed)
	p.changed = make(chan struct{})
	return true
}

func (p *plugin) snapshot() (int, chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.count, p.changed
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, s pluginapi.DevicePlugin_ListAndWatchServer) error {
	for {
		n, changed := p.snapshot()
		devs := make([]*pluginapi.Device, 0, n)
		for _, id := range deviceIDs(n) {
			devs = append(devs, &pluginapi.Device{ID: id, Health: pluginapi.Healthy})
		}
		if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: devs}); err != nil {
			return err
		}
		log.Printf("advertised %d devices", n)
		select {
		case <-changed:
		case <-s.Context().Done():
			return nil
		}
	}
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		log.Printf("allocate %v", c.DevicesIds)
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func readCount(path string) (int, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%s: want a device count >= 0, got %q", path, strings.TrimSpace(string(raw)))
	}
	return n, nil
}

// serve listens on the plugin socket and registers with the kubelet; it returns when
// the socket disappears (the kubelet removes plugin sockets when it restarts).
func serve(ctx context.Context, p *plugin, dir, sockName, resource string) error {
	sock := filepath.Join(dir, sockName)
	_ = os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, p)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, filepath.Base(pluginapi.KubeletSocket)),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = pluginapi.NewRegistrationClient(conn).Register(rctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: sockName, ResourceName: resource,
		Options: &pluginapi.DevicePluginOptions{},
	})
	cancel()
	_ = conn.Close()
	if err != nil {
		return fmt.Errorf("register with the kubelet: %w", err)
	}
	log.Printf("registered %s at %s", resource, sock)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
		if _, err := os.Stat(sock); err != nil {
			return fmt.Errorf("socket %s gone (kubelet restarted?)", sock)
		}
	}
}

func main() {
	dir := flag.String("socket-dir", pluginapi.DevicePluginPath, "the kubelet's device-plugin directory")
	sockName := flag.String("socket-name", "inferencefleet-gpu.sock", "this plugin's socket in --socket-dir")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource to advertise")
	countFile := flag.String("devices-file", "", "file holding the number of devices to advertise")
	flag.Parse()
	if *countFile == "" {
		log.Fatal("--devices-file is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	p := &plugin{count: 0, changed: make(chan struct{})}
	poll := func() {
		n, err := readCount(*countFile)
		if err != nil {
			log.Printf("devices file: %v", err)
			return
		}
		if p.set(n) {
			log.Printf("device count now %d", n)
		}
	}
	poll()
	go func() {
		for ctx.Err() == nil {
			time.Sleep(time.Second)
			poll()
		}
	}()
	for ctx.Err() == nil {
		if err := serve(ctx, p, *dir, *sockName, *resource); err != nil {
			log.Printf("%v; retrying", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
	_ = os.Remove(filepath.Join(*dir, *sockName))
	log.Print("stopped")
}
