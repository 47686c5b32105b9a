package microsandbox

import (
	"fmt"
	"net"
	"strings"
)

// NetworkPolicyPreset names a network policy preset: the wire's preset names, or a
// comma list of the profiles "public", "private" and "host".
type NetworkPolicyPreset string

const (
	// NetworkPolicyPresetNone blocks all network access.
	NetworkPolicyPresetNone NetworkPolicyPreset = "none"
	// NetworkPolicyPresetPublicOnly allows the public internet (and DNS through the
	// gateway) only: the default.
	NetworkPolicyPresetPublicOnly NetworkPolicyPreset = "public-only"
	// NetworkPolicyPresetAllowAll allows everything.
	NetworkPolicyPresetAllowAll NetworkPolicyPreset = "allow-all"
	// NetworkPolicyPresetNonLocal allows the public internet and private/LAN ranges;
	// loopback, link-local and metadata stay blocked.
	NetworkPolicyPresetNonLocal NetworkPolicyPreset = "public,private"
)

// PolicyAction is what a rule does with a matching connection.
type PolicyAction string

const (
	PolicyActionAllow PolicyAction = "allow"
	PolicyActionDeny  PolicyAction = "deny"
)

// PolicyDirection is which connections a rule applies to.
type PolicyDirection string

const (
	// PolicyDirectionEgress: connections opened by the guest (the default).
	PolicyDirectionEgress PolicyDirection = "egress"
	// PolicyDirectionIngress: connections to published ports.
	PolicyDirectionIngress PolicyDirection = "ingress"
	// PolicyDirectionAny: both.
	PolicyDirectionAny PolicyDirection = "any"
)

// PolicyProtocol is a protocol a rule can name.
type PolicyProtocol string

const (
	PolicyProtocolTCP    PolicyProtocol = "tcp"
	PolicyProtocolUDP    PolicyProtocol = "udp"
	PolicyProtocolICMPv4 PolicyProtocol = "icmpv4"
	PolicyProtocolICMPv6 PolicyProtocol = "icmpv6"
)

// PolicyRule is one firewall rule; rules match in order, the first match wins.
type PolicyRule struct {
	Action    PolicyAction
	Direction PolicyDirection
	// Destination: "*" or "any", a group ("public", "private", "loopback",
	// "link-local", "metadata", "multicast", "host"), an IP, a CIDR, a domain suffix
	// (".internal") or a domain ("api.example.com").
	Destination string
	// Protocol is a single protocol; Protocols several. Both empty: any.
	Protocol  PolicyProtocol
	Protocols []PolicyProtocol
	// Port is a port ("443") or range ("8000-9000"); Ports several.
	Port  string
	Ports []string
}

var destinationGroups = map[string]bool{
	"public": true, "loopback": true, "private": true, "link-local": true,
	"metadata": true, "multicast": true, "host": true,
}

// String renders the rule in the core's text form:
// ACTION DIRECTION [PROTOCOLS] DESTINATION [PORTS].
func (r PolicyRule) String() string {
	words := []string{string(r.Action)}
	switch r.Direction {
	case "":
		words = append(words, "egress")
	case PolicyDirectionAny:
		words = append(words, "both")
	default:
		words = append(words, string(r.Direction))
	}
	var protos []string
	if r.Protocol != "" {
		protos = append(protos, string(r.Protocol))
	}
	for _, p := range r.Protocols {
		protos = append(protos, string(p))
	}
	if len(protos) > 0 {
		words = append(words, strings.Join(protos, ","))
	}
	words = append(words, ruleDestination(r.Destination))
	var ports []string
	if r.Port != "" {
		ports = append(ports, r.Port)
	}
	ports = append(ports, r.Ports...)
	if len(ports) > 0 {
		words = append(words, strings.Join(ports, ","))
	}
	return strings.Join(words, " ")
}

func ruleDestination(d string) string {
	switch {
	case d == "" || d == "*" || d == "any":
		return "any"
	case strings.HasPrefix(d, "domain=") || strings.HasPrefix(d, "suffix="):
		return d
	case destinationGroups[d]:
		return d
	case net.ParseIP(d) != nil:
		return d
	}
	if _, _, err := net.ParseCIDR(d); err == nil {
		return d
	}
	if strings.HasPrefix(d, ".") {
		return "suffix=" + strings.TrimPrefix(d, ".")
	}
	return "domain=" + d
}

// DNSConfig configures the sandbox's DNS proxy.
type DNSConfig struct {
	// RebindProtection refuses answers pointing into private ranges (default on).
	RebindProtection *bool
	// Nameservers are upstream resolvers ("127.0.0.53:53").
	Nameservers []string
	// QueryTimeoutMs caps a query's time (default 5000).
	QueryTimeoutMs *uint64
}

// TLSConfig configures TLS interception.
type TLSConfig struct {
	// Enabled turns interception on or off (nil: the core's default).
	Enabled *bool
	// Bypass lists host patterns ("*.example.com") never intercepted.
	Bypass []string
	// VerifyUpstream verifies upstream certificates (default on).
	VerifyUpstream *bool
	// InterceptedPorts are the ports intercepted (default [443]).
	InterceptedPorts []uint16
	// BlockQUIC blocks QUIC on intercepted ports.
	BlockQUIC *bool
	// UpstreamCACert is a host path of an extra CA bundle for upstream verification.
	UpstreamCACert string
	// CACert and CAKey are host paths of the interception CA (PEM).
	CACert string
	CAKey  string
}

// NetworkConfig configures the sandbox network.
type NetworkConfig struct {
	// Enabled turns the network off when false.
	Enabled *bool
	// Policy is a preset (NetworkPolicyPreset*).
	Policy NetworkPolicyPreset
	// Rules are custom rules, first match wins.
	Rules []PolicyRule
	// DNS configures the DNS proxy.
	DNS *DNSConfig
	// TLS configures TLS interception.
	TLS *TLSConfig
	// MaxConnections caps concurrent connections from the sandbox.
	MaxConnections *uint
	// MTU is the guest link's MTU.
	MTU *uint16
}

type networkPolicyFactory struct{}

// NetworkPolicy builds NetworkConfig presets:
//
//	m.WithNetwork(m.NetworkPolicy.PublicOnly())
var NetworkPolicy networkPolicyFactory

// None blocks all network access.
func (networkPolicyFactory) None() *NetworkConfig {
	return &NetworkConfig{Policy: NetworkPolicyPresetNone}
}

// PublicOnly allows the public internet only (the default).
func (networkPolicyFactory) PublicOnly() *NetworkConfig {
	return &NetworkConfig{Policy: NetworkPolicyPresetPublicOnly}
}

// AllowAll allows all traffic.
func (networkPolicyFactory) AllowAll() *NetworkConfig {
	return &NetworkConfig{Policy: NetworkPolicyPresetAllowAll}
}

// NonLocal allows the public internet and private ranges.
func (networkPolicyFactory) NonLocal() *NetworkConfig {
	return &NetworkConfig{Policy: NetworkPolicyPresetNonLocal}
}

// Disabled turns the network off.
func (networkPolicyFactory) Disabled() *NetworkConfig {
	off := false
	return &NetworkConfig{Enabled: &off}
}

func (n *NetworkConfig) wire() (map[string]any, error) {
	w := map[string]any{}
	if n.Enabled != nil {
		w["enabled"] = *n.Enabled
	}
	if n.Policy != "" {
		w["policy"] = string(n.Policy)
	}
	if len(n.Rules) > 0 {
		rules := make([]string, 0, len(n.Rules))
		for i, r := range n.Rules {
			if r.Action != PolicyActionAllow && r.Action != PolicyActionDeny {
				return nil, invalidArgument(fmt.Sprintf("network rule %d: action must be allow or deny, not %q", i, r.Action))
			}
			rules = append(rules, r.String())
		}
		w["rules"] = rules
	}
	if n.DNS != nil {
		d := map[string]any{}
		if n.DNS.RebindProtection != nil {
			d["rebind_protection"] = *n.DNS.RebindProtection
		}
		if len(n.DNS.Nameservers) > 0 {
			d["nameservers"] = n.DNS.Nameservers
		}
		if n.DNS.QueryTimeoutMs != nil {
			d["query_timeout_ms"] = *n.DNS.QueryTimeoutMs
		}
		w["dns"] = d
	}
	if n.MaxConnections != nil {
		w["max_connections"] = *n.MaxConnections
	}
	if n.MTU != nil {
		w["mtu"] = *n.MTU
	}
	if n.TLS != nil {
		t := map[string]any{}
		if n.TLS.Enabled != nil {
			t["enabled"] = *n.TLS.Enabled
		}
		if len(n.TLS.Bypass) > 0 {
			t["bypass"] = n.TLS.Bypass
		}
		if n.TLS.VerifyUpstream != nil {
			t["verify_upstream"] = *n.TLS.VerifyUpstream
		}
		if len(n.TLS.InterceptedPorts) > 0 {
			t["intercepted_ports"] = n.TLS.InterceptedPorts
		}
		if n.TLS.BlockQUIC != nil {
			t["block_quic"] = *n.TLS.BlockQUIC
		}
		setString(t, "upstream_ca_cert", n.TLS.UpstreamCACert)
		setString(t, "intercept_ca_cert", n.TLS.CACert)
		setString(t, "intercept_ca_key", n.TLS.CAKey)
		w["tls"] = t
	}
	return w, nil
}

// ---------------------------------------------------------------------------------
// Secrets

// ViolationAction is what happens when a secret is sent to a host it is not allowed for.
type ViolationAction string

const (
	ViolationActionBlock             ViolationAction = "block"
	ViolationActionBlockAndLog       ViolationAction = "block-and-log"
	ViolationActionBlockAndTerminate ViolationAction = "block-and-terminate"
)

// SecretEntry is a credential the network proxy substitutes for a placeholder at the
// transport layer; the value never enters the VM. Exactly one of Value, HostEnv and
// File is the source (Value when the others are empty).
type SecretEntry struct {
	// EnvVar is the guest environment variable holding the placeholder.
	EnvVar string
	// Value is the secret itself.
	Value string
	// HostEnv names a host environment variable holding the secret.
	HostEnv string
	// File is a host file holding the secret.
	File string
	// AllowHosts are the exact hosts the secret may be sent to.
	AllowHosts []string
	// AllowHostPatterns are host patterns ("*.openai.com").
	AllowHostPatterns []string
	// AllowAnyHostDangerous allows every host.
	AllowAnyHostDangerous bool
	// Placeholder is the guest-visible stand-in (default $MSB_<ENV_VAR>).
	Placeholder string
	// RequireTLS requires a verified TLS identity before substituting (default true).
	RequireTLS *bool
	// OnViolation is the action on a disallowed host.
	OnViolation ViolationAction
	// Where the proxy substitutes (headers, basic auth, query, body).
	InjectHeaders   *bool
	InjectBasicAuth *bool
	InjectQuery     *bool
	InjectBody      *bool
}

// SecretEnvOptions tunes Secret.Env.
type SecretEnvOptions struct {
	AllowHosts        []string
	AllowHostPatterns []string
	Placeholder       string
	RequireTLS        *bool
	OnViolation       ViolationAction
}

type secretFactory struct{}

// Secret builds SecretEntry values for WithSecrets.
var Secret secretFactory

// Env makes a secret exposed to the guest as a placeholder in envVar.
func (secretFactory) Env(envVar, value string, opts SecretEnvOptions) SecretEntry {
	return SecretEntry{
		EnvVar:            envVar,
		Value:             value,
		AllowHosts:        opts.AllowHosts,
		AllowHostPatterns: opts.AllowHostPatterns,
		Placeholder:       opts.Placeholder,
		RequireTLS:        opts.RequireTLS,
		OnViolation:       opts.OnViolation,
	}
}

func (s SecretEntry) wire() (map[string]any, error) {
	if s.EnvVar == "" {
		return nil, invalidArgument("secret: empty EnvVar")
	}
	w := map[string]any{"env": s.EnvVar}
	sources := 0
	if s.HostEnv != "" {
		w["host_env"] = s.HostEnv
		sources++
	}
	if s.File != "" {
		w["file"] = s.File
		sources++
	}
	if s.Value != "" || sources == 0 {
		w["value"] = s.Value
		sources++
	}
	if sources > 1 {
		return nil, invalidArgument(fmt.Sprintf("secret %s: Value, HostEnv and File are exclusive", s.EnvVar))
	}
	if len(s.AllowHosts) > 0 {
		w["allow_hosts"] = s.AllowHosts
	}
	if len(s.AllowHostPatterns) > 0 {
		w["allow_host_patterns"] = s.AllowHostPatterns
	}
	if s.AllowAnyHostDangerous {
		w["allow_any_host_dangerous"] = true
	}
	setString(w, "placeholder", s.Placeholder)
	setString(w, "on_violation", string(s.OnViolation))
	setBool := func(key string, v *bool) {
		if v != nil {
			w[key] = *v
		}
	}
	setBool("require_tls_identity", s.RequireTLS)
	setBool("inject_headers", s.InjectHeaders)
	setBool("inject_basic_auth", s.InjectBasicAuth)
	setBool("inject_query", s.InjectQuery)
	setBool("inject_body", s.InjectBody)
	return w, nil
}
