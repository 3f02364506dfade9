//! `ward redirect-init`: the iptables rules that send a pod's TCP traffic
//! through its sidecar, for pods annotated `ward.io/interception: redirect`.
//!
//! Run once per pod, as an init container with `NET_ADMIN` and `NET_RAW`
//! (and uid 0), before the app and Envoy start; it changes only the pod's
//! own network namespace. The rules (table `nat`):
//!
//! - `PREROUTING` → `WARD_INBOUND`: every incoming TCP connection, except to
//!   excluded ports, is redirected to the sidecar's port 15006.
//! - `OUTPUT` → `WARD_OUTPUT`: every outgoing TCP connection is redirected to
//!   `127.0.0.1:15001`, except the sidecar's own (its uid or gid — this is
//!   what stops the loop), connections to `127.0.0.1`, and excluded
//!   destination ports or CIDRs.
//!
//! Applying twice leaves one copy of every rule: Ward's chains are flushed
//! and refilled by `iptables-restore --noflush`, and the jumps into them are
//! added only when missing. UDP (DNS) is never touched. IPv4 only.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::translate::names::{REDIRECT_INBOUND_PORT, REDIRECT_OUTBOUND_PORT};

/// Envoy's uid and gid in the official image (`envoyproxy/envoy`).
pub const ENVOY_UID: u32 = 101;

/// Ward's chains in table `nat`.
pub const INBOUND_CHAIN: &str = "WARD_INBOUND";
pub const INBOUND_REDIRECT_CHAIN: &str = "WARD_IN_REDIRECT";
pub const OUTPUT_CHAIN: &str = "WARD_OUTPUT";
pub const OUTBOUND_REDIRECT_CHAIN: &str = "WARD_REDIRECT";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot run {command}: {source} (is iptables installed and on PATH?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error(
        "{command} failed ({status}): {stderr} (the init container needs the NET_ADMIN and \
         NET_RAW capabilities and uid 0)"
    )]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What to redirect and what to leave alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectRules {
    /// The sidecar's uid: its own connections are never redirected.
    pub proxy_uid: u32,
    /// The sidecar's gid, exempt as well (a sidecar run under another uid
    /// but the same group still does not loop).
    pub proxy_gid: u32,
    /// Incoming destination ports left alone (e.g. Envoy's admin port, or
    /// a port kubelet probes that must stay plaintext).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outgoing destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outgoing destinations left alone (e.g. the API server).
    pub exclude_outbound_cidrs: Vec<Ipv4Net>,
}

impl Default for RedirectRules {
    fn default() -> Self {
        Self {
            proxy_uid: ENVOY_UID,
            proxy_gid: ENVOY_UID,
            exclude_inbound_ports: vec![crate::bootstrap::DEFAULT_ENVOY_ADMIN_PORT],
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

impl RedirectRules {
    /// Ward's chains as `iptables-restore --noflush` input, plus the given
    /// jumps from built-in chains (see [`JUMPS`]; those that already exist
    /// are left out).
    pub fn restore_input(&self, jumps: &[(&str, &str)]) -> String {
        let mut out = String::from("*nat\n");
        for chain in [
            INBOUND_CHAIN,
            INBOUND_REDIRECT_CHAIN,
            OUTPUT_CHAIN,
            OUTBOUND_REDIRECT_CHAIN,
        ] {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        let mut rule = |chain: &str, spec: &str| out.push_str(&format!("-A {chain} {spec}\n"));
        rule(
            INBOUND_REDIRECT_CHAIN,
            &format!("-p tcp -j REDIRECT --to-ports {REDIRECT_INBOUND_PORT}"),
        );
        for port in &self.exclude_inbound_ports {
            rule(INBOUND_CHAIN, &format!("-p tcp --dport {port} -j RETURN"));
        }
        rule(
            INBOUND_CHAIN,
            &format!("-p tcp -j {INBOUND_REDIRECT_CHAIN}"),
        );

        rule(
            OUTBOUND_REDIRECT_CHAIN,
            &format!("-p tcp -j REDIRECT --to-ports {REDIRECT_OUTBOUND_PORT}"),
        );
        rule(
            OUTPUT_CHAIN,
            &format!("-m owner --uid-owner {} -j RETURN", self.proxy_uid),
        );
        rule(
            OUTPUT_CHAIN,
            &format!("-m owner --gid-owner {} -j RETURN", self.proxy_gid),
        );
        rule(OUTPUT_CHAIN, "-d 127.0.0.1/32 -j RETURN");
        for cidr in &self.exclude_outbound_cidrs {
            rule(OUTPUT_CHAIN, &format!("-d {cidr} -j RETURN"));
        }
        for port in &self.exclude_outbound_ports {
            rule(OUTPUT_CHAIN, &format!("-p tcp --dport {port} -j RETURN"));
        }
        rule(OUTPUT_CHAIN, &format!("-j {OUTBOUND_REDIRECT_CHAIN}"));
        for (from, to) in jumps {
            rule(from, &format!("-p tcp -j {to}"));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Install the rules with `<iptables>-restore --noflush` (`iptables` is
    /// the command to use: `iptables`, `iptables-legacy` or
    /// `iptables-nft`). Returns what was applied.
    pub fn apply(&self, iptables: &str) -> Result<String, RedirectError> {
        // One restore is atomic; the jumps are checked first so a second run
        // does not add a second jump.
        let mut missing = Vec::new();
        for (from, to) in JUMPS {
            let exists = Command::new(iptables)
                .args(["-t", "nat", "-C", from, "-p", "tcp", "-j", to])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|source| RedirectError::Spawn {
                    command: iptables.to_string(),
                    source,
                })?
                .success();
            if !exists {
                missing.push((from, to));
            }
        }
        let input = self.restore_input(&missing);
        let restore = format!("{iptables}-restore");
        let io_err = |source| RedirectError::Spawn {
            command: restore.clone(),
            source,
        };
        let mut child = Command::new(&restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(io_err)?;
        }
        let out = child.wait_with_output().map_err(io_err)?;
        if !out.status.success() {
            return Err(RedirectError::Failed {
                command: format!("{restore} --noflush"),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(input)
    }
}

/// Jumps from the built-in chains into Ward's.
pub const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];

/// Parse a comma-separated port list (`15000,15090`); empty → none.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{p:?} is not a port (1-65535)")),
        })
        .collect()
}

/// Parse a comma-separated IPv4 CIDR list (`10.96.0.1/32,169.254.0.0/16`);
/// a bare address means `/32`.
pub fn parse_cidrs(s: &str) -> Result<Vec<Ipv4Net>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<Ipv4Net>()
                .or_else(|_| p.parse::<std::net::Ipv4Addr>().map(Ipv4Net::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("{p:?} is not an IPv4 address or CIDR (a.b.c.d/n)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules() {
        insta::assert_snapshot!(RedirectRules::default().restore_input(&JUMPS), @r"
        *nat
        :WARD_INBOUND - [0:0]
        :WARD_IN_REDIRECT - [0:0]
        :WARD_OUTPUT - [0:0]
        :WARD_REDIRECT - [0:0]
        -A WARD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
        -A WARD_INBOUND -p tcp --dport 15000 -j RETURN
        -A WARD_INBOUND -p tcp -j WARD_IN_REDIRECT
        -A WARD_REDIRECT -p tcp -j REDIRECT --to-ports 15001
        -A WARD_OUTPUT -m owner --uid-owner 101 -j RETURN
        -A WARD_OUTPUT -m owner --gid-owner 101 -j RETURN
        -A WARD_OUTPUT -d 127.0.0.1/32 -j RETURN
        -A WARD_OUTPUT -j WARD_REDIRECT
        -A PREROUTING -p tcp -j WARD_INBOUND
        -A OUTPUT -p tcp -j WARD_OUTPUT
        COMMIT
        ");
    }

    #[test]
    fn exclusions_come_before_the_redirect() {
        let rules = RedirectRules {
            proxy_uid: 1337,
            proxy_gid: 1338,
            exclude_inbound_ports: vec![22, 15000],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: parse_cidrs("10.96.0.1, 169.254.0.0/16").unwrap(),
        };
        let input = rules.restore_input(&[]);
        assert!(!input.contains("-A PREROUTING"), "{input}");
        assert!(!input.contains("-A OUTPUT"), "{input}");
        let lines: Vec<&str> = input.lines().collect();
        let pos = |s: &str| {
            lines
                .iter()
                .position(|l| *l == s)
                .unwrap_or_else(|| panic!("{s:?} missing from\n{input}"))
        };
        let redirect_in = pos("-A WARD_INBOUND -p tcp -j WARD_IN_REDIRECT");
        assert!(pos("-A WARD_INBOUND -p tcp --dport 22 -j RETURN") < redirect_in);
        let redirect_out = pos("-A WARD_OUTPUT -j WARD_REDIRECT");
        for rule in [
            "-A WARD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A WARD_OUTPUT -m owner --gid-owner 1338 -j RETURN",
            "-A WARD_OUTPUT -d 10.96.0.1/32 -j RETURN",
            "-A WARD_OUTPUT -d 169.254.0.0/16 -j RETURN",
            "-A WARD_OUTPUT -p tcp --dport 5432 -j RETURN",
        ] {
            assert!(pos(rule) < redirect_out, "{rule}");
        }
    }

    #[test]
    fn lists_parse_with_clear_errors() {
        assert_eq!(parse_ports("15000, 15090,").unwrap(), vec![15000, 15090]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        assert_eq!(
            parse_ports("80,http").unwrap_err(),
            "\"http\" is not a port (1-65535)"
        );
        assert_eq!(
            parse_ports("0").unwrap_err(),
            "\"0\" is not a port (1-65535)"
        );
        assert_eq!(
            parse_cidrs("10.0.0.7/8").unwrap(),
            vec!["10.0.0.0/8".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(
            parse_cidrs("10.0.0.0/33").unwrap_err(),
            "\"10.0.0.0/33\" is not an IPv4 address or CIDR (a.b.c.d/n)"
        );
    }
}
