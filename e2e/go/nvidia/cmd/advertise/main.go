// Command advertise reads an NVIDIA device-plugin config file with NVIDIA's own
// api/config/v1 (the same calls the plugin makes when it starts) and prints, as one
// JSON line, what a node running that config advertises for nvidia.com/gpu:
//
//	{"resource":"nvidia.com/gpu","replicas":4,"strategy":"time-slicing","renamed":false,"product_suffix":"-SHARED"}
//
// or {"error":"..."} and exit status 1 when the plugin would refuse the config.
//
// With --watch it stays up like the plugin: it prints a line at start and again on
// every SIGHUP (the signal NVIDIA's config-manager sends after switching configs),
// and exits 1 when a config is refused, as the plugin does. The test cluster runs it
// under the name nvidia-device-plugin so that config-manager finds it.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	spec "github.com/NVIDIA/k8s-device-plugin/api/config/v1"
	cli "github.com/urfave/cli/v2"
)

// gpuResource is the resource the plugin advertises for full GPUs.
const gpuResource = spec.ResourceName("nvidia.com/gpu")

// Advertised is what one config makes the node advertise for full GPUs.
type Advertised struct {
	Resource      string `json:"resource"`
	Replicas      int    `json:"replicas"`
	Strategy      string `json:"strategy"`
	Renamed       bool   `json:"renamed"`
	ProductSuffix string `json:"product_suffix"`
	MigStrategy   string `json:"mig_strategy"`
}

func main() {
	// The plugin's own flag names, defaults and environment variables for the settings
	// that decide sharing (cmd/nvidia-device-plugin/main.go, v0.19.0).
	flags := []cli.Flag{
		&cli.StringFlag{Name: "config-file", EnvVars: []string{"CONFIG_FILE"}},
		&cli.StringFlag{Name: "mig-strategy", Value: spec.MigStrategyNone, EnvVars: []string{"MIG_STRATEGY"}},
		&cli.StringFlag{Name: "mps-root", EnvVars: []string{"MPS_ROOT"}},
	}
	own := []cli.Flag{
		&cli.BoolFlag{Name: "mig-enabled", Usage: "the node's GPUs are in MIG mode"},
		&cli.BoolFlag{Name: "watch", Usage: "stay up; print again on SIGHUP; exit 1 on a refused config"},
	}
	app := cli.NewApp()
	app.Name = "advertise"
	app.Usage = "what a node advertises for an NVIDIA device-plugin config (NVIDIA's parser)"
	app.Flags = append(flags, own...)
	app.Action = func(c *cli.Context) error {
		if !c.Bool("watch") {
			return report(advertised(c, flags))
		}
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		for {
			if err := report(advertised(c, flags)); err != nil {
				return err
			}
			<-hup
		}
	}
	if err := app.Run(os.Args); err != nil {
		os.Exit(1)
	}
}

func report(a *Advertised, err error) error {
	out := json.NewEncoder(os.Stdout) // one line per report, ">=" kept as is
	out.SetEscapeHTML(false)
	if err != nil {
		_ = out.Encode(map[string]string{"error": err.Error()})
		return err
	}
	return out.Encode(a)
}

func advertised(c *cli.Context, flags []cli.Flag) (*Advertised, error) {
	// As the plugin's startPlugins: load, then drop per-resource renaming and devices.
	config, err := spec.NewConfig(c, flags)
	if err != nil {
		return nil, fmt.Errorf("unable to load config: unable to finalize config: %v", err)
	}
	spec.DisableResourceNamingInConfig(config)

	strategy := config.Sharing.SharingStrategy()
	mig := *config.Flags.MigStrategy
	// The plugin's validateFlags (package main upstream, so restated here).
	if strategy == spec.SharingStrategyMPS {
		if mig == spec.MigStrategyMixed {
			return nil, fmt.Errorf("unable to validate flags: using --mig-strategy=mixed is not supported with MPS")
		}
		if config.Flags.MpsRoot == nil || *config.Flags.MpsRoot == "" {
			return nil, fmt.Errorf("unable to validate flags: using MPS requires --mps-root to be specified")
		}
	}
	switch mig {
	case spec.MigStrategyNone, spec.MigStrategySingle, spec.MigStrategyMixed:
	default:
		return nil, fmt.Errorf("unable to validate flags: unknown MIG strategy: %v", mig)
	}
	// With MIG mode on and a MIG strategy, the devices are MIG devices, and the plugin's
	// MPS options refuse those (internal/plugin/mps.go).
	if strategy == spec.SharingStrategyMPS && mig != spec.MigStrategyNone && c.Bool("mig-enabled") {
		return nil, fmt.Errorf("error getting plugins: sharing using MPS is not supported for MIG devices")
	}

	a := &Advertised{Resource: string(gpuResource), Replicas: 1, Strategy: string(spec.SharingStrategyNone), MigStrategy: mig}
	// As feature discovery's resource labeler (internal/lm/resource.go).
	for _, r := range config.Sharing.ReplicatedResources().Resources {
		if r.Name != gpuResource {
			continue
		}
		if r.Replicas > 0 {
			a.Replicas = r.Replicas
		}
		if r.Rename != "" {
			a.Resource, a.Renamed = string(r.Rename), true
		}
	}
	if a.Replicas > 1 {
		a.Strategy = string(strategy)
		if !a.Renamed {
			a.ProductSuffix = "-SHARED"
		}
	}
	return a, nil
}
