//! The whole lab: a primary and a streaming replica, a fault tunnel on the
//! path to the primary (the SSH tunnel of production), and pgsplit in front.
//! Used by `pgsplit lab`, the integration tests and the benchmarks.

use std::future::Future;
use std::net::SocketAddr;

use pgsplit_server::config::{Config, Overrides};

use crate::proxy::RunningProxy;
use crate::{Cluster, LabError, LabOptions, Tunnel};

/// How to build a [`Stack`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub lab: LabOptions,
    /// Where pgsplit listens; port 0 picks a free one.
    pub listen: SocketAddr,
    /// `section.key=value` overrides for the proxy's configuration.
    pub set: Vec<String>,
    /// Extra TOML prepended to the proxy's configuration (e.g. more users).
    pub toml: String,
    /// pgsplit reaches the primary through the fault tunnel (as through the
    /// SSH tunnel in production). Benchmarks turn it off to measure the
    /// proxy alone.
    pub primary_through_tunnel: bool,
    /// pgsplit reaches the replica (a local server) through its unix socket
    /// rather than TCP.
    pub replica_via_unix_socket: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            lab: LabOptions::default(),
            listen: "127.0.0.1:0".parse().expect("literal"),
            set: Vec::new(),
            toml: String::new(),
            primary_through_tunnel: true,
            replica_via_unix_socket: false,
        }
    }
}

/// Servers, tunnel and proxy; dropping it stops everything and removes the
/// data.
pub struct Stack {
    // Field order is drop order: the proxy first, then the tunnel, then the servers.
    proxy: Option<RunningProxy>,
    tunnel: Tunnel,
    cluster: Cluster,
    opts: StackOptions,
}

impl Stack {
    /// Starts everything.
    ///
    /// # Errors
    /// A [`LabError`] from the servers or the proxy's configuration.
    pub fn start(opts: StackOptions) -> Result<Stack, LabError> {
        let cluster = Cluster::start(opts.lab.clone())?;
        let tunnel = Tunnel::start(cluster.primary_addr()).map_err(|source| LabError::Io {
            context: "starting the primary tunnel".into(),
            source,
        })?;
        let mut stack = Stack {
            proxy: None,
            tunnel,
            cluster,
            opts,
        };
        stack.restart_proxy(&[])?;
        Ok(stack)
    }

    /// The proxy configuration this stack runs, with `extra` overrides.
    ///
    /// # Errors
    /// `LabError::Config` when the overrides are invalid.
    pub fn proxy_config(&self, extra: &[String]) -> Result<Config, LabError> {
        let overrides = self.overrides(extra);
        Config::from_toml(&self.opts.toml, &overrides).map_err(|e| LabError::Config(e.to_string()))
    }

    /// The command-line settings this stack gives the proxy.
    fn overrides(&self, extra: &[String]) -> Overrides {
        let o = &self.opts.lab;
        // Many labs run at once (tests): the admin endpoint takes a free port.
        let mut set = vec!["admin.listen=127.0.0.1:0".to_owned()];
        set.extend_from_slice(&self.opts.set);
        set.extend_from_slice(extra);
        let primary = if self.opts.primary_through_tunnel {
            self.tunnel.addr()
        } else {
            self.cluster.primary_addr()
        };
        let mut overrides = Overrides {
            listen: Some(self.opts.listen),
            primary_url: Some(format!(
                "postgres://{}:{}@{}/{}",
                o.user, o.password, primary, o.database
            )),
            replica_url: Some(format!(
                "postgres://{}:{}@{}/{}",
                o.user,
                o.password,
                self.cluster.replica_addr(),
                o.database
            )),
            set,
        };
        if self.opts.replica_via_unix_socket {
            let dir = self.cluster.server(crate::Which::Replica).socket_dir();
            set_socket(&mut overrides.set, dir, self.cluster.replica_addr().port());
        }
        overrides
    }

    /// Replaces the running proxy with one using `extra` overrides.
    ///
    /// # Errors
    /// Invalid overrides or a bind failure.
    pub fn restart_proxy(&mut self, extra: &[String]) -> Result<(), LabError> {
        let config = self.proxy_config(extra)?;
        self.proxy = None;
        let proxy = RunningProxy::start(config).map_err(|source| LabError::Io {
            context: "starting pgsplit".into(),
            source,
        })?;
        // The TOML text goes to a file the proxy reloads from (SIGHUP,
        // RELOAD), with the same overrides it was started with.
        let file = self.config_file();
        std::fs::write(&file, &self.opts.toml).map_err(|source| LabError::Io {
            context: format!("writing {}", file.display()),
            source,
        })?;
        let overrides = self.overrides(extra);
        proxy
            .shared()
            .live
            .set_source(pgsplit_server::reload::Source {
                path: Some(file),
                overrides,
            });
        self.proxy = Some(proxy);
        Ok(())
    }

    /// The file the proxy's configuration is reloaded from: the stack's
    /// TOML text, which a test may rewrite before a reload.
    pub fn config_file(&self) -> std::path::PathBuf {
        self.cluster.dir().join("proxy.toml")
    }

    pub fn proxy(&self) -> &RunningProxy {
        self.proxy.as_ref().expect("proxy running")
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy().addr()
    }

    /// libpq keyword/value connection string for the proxy.
    pub fn conn_string(&self) -> String {
        let o = &self.opts.lab;
        let a = self.proxy_addr();
        format!(
            "host={} port={} user={} password={} dbname={}",
            a.ip(),
            a.port(),
            o.user,
            o.password,
            o.database
        )
    }

    /// `postgres://` URL for the proxy (what an app's DATABASE_URL holds).
    pub fn url(&self) -> String {
        let o = &self.opts.lab;
        format!(
            "postgres://{}:{}@{}/{}",
            o.user,
            o.password,
            self.proxy_addr(),
            o.database
        )
    }

    /// The tunnel between pgsplit and the primary.
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }

    pub fn options(&self) -> &StackOptions {
        &self.opts
    }
}

/// Points the replica at a unix socket directory (the URL form cannot).
fn set_socket(set: &mut Vec<String>, dir: &std::path::Path, port: u16) {
    set.push(format!("replica.host=\"{}\"", dir.display()));
    set.push(format!("replica.port={port}"));
}

/// `pgsplit lab`: starts a stack on `listen`, prints how to use it, and
/// tears everything down when `shutdown` completes.
///
/// # Errors
/// A [`LabError`] when the servers or the proxy cannot start.
pub fn run_interactive(
    listen: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LabError> {
    eprintln!("pgsplit lab: starting a primary and a streaming replica…");
    // The admin endpoint on its documented port when that is free.
    let mut set = Vec::new();
    if std::net::TcpListener::bind("127.0.0.1:9930").is_ok() {
        set.push("admin.listen=127.0.0.1:9930".to_owned());
    }
    let stack = Stack::start(StackOptions {
        listen,
        set,
        ..Default::default()
    })?;
    let c = stack.cluster();
    let url = stack.url();
    println!();
    println!(
        "  primary  {}   (pgsplit reaches it through a tunnel at {})",
        c.primary_addr(),
        stack.tunnel().addr()
    );
    println!(
        "  replica  {}   (streaming from the primary)",
        c.replica_addr()
    );
    println!("  pgsplit  {}", stack.proxy_addr());
    if let Some(admin) = stack.proxy().admin_addr() {
        println!("  metrics  http://{admin}/metrics   health  http://{admin}/health");
    }
    println!();
    println!("  DATABASE_URL={url}");
    println!();
    println!("  psql \"{url}\" -c 'SELECT inet_server_port()'     # a read: the replica's port");
    println!(
        "  psql \"{url}\" -c 'CREATE TABLE t (x int); INSERT INTO t VALUES (1)' -c 'SHOW pgsplit.last_route'"
    );
    println!(
        "  psql \"postgres://{}:{}@{}/pgsplit\" -c 'SHOW POOLS'   # the console",
        stack.options().lab.user,
        stack.options().lab.password,
        stack.proxy_addr()
    );
    println!("  pgbench -i \"{url}\" && pgbench -S -c 4 -T 10 \"{url}\"");
    println!();
    println!(
        "  Ctrl-C stops everything and removes the data ({}).",
        c.dir().display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| LabError::Io {
            context: "runtime".into(),
            source,
        })?;
    rt.block_on(shutdown);
    eprintln!("pgsplit lab: stopping…");
    let dir = stack.cluster().dir().to_path_buf();
    drop(stack);
    eprintln!(
        "pgsplit lab: stopped; {} removed (the cached template cluster in {} stays, to start the next lab in a second)",
        dir.display(),
        dir.parent().map_or_else(String::new, |p| p.display().to_string())
    );
    Ok(())
}
