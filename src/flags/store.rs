//! Where the shared state lives: one Redis, a Sentinel group, or a Redis Cluster.
//!
//! Everything that talks to Redis (the flag watcher, the canary analysis, SMS
//! commands, the fleet heartbeats, `canary status`) opens a [`Store`] from
//! `flags.redis_url` and takes [`Conn`]s from it, so all of them follow a failover
//! the same way: a broken connection is dropped, and the next one is made to
//! whatever is master then.
//!
//! - `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS): one server.
//! - `redis+sentinel://[user:password@]host1:26379,host2:26379/<master name>[/db][?sentinel_password=...]`:
//!   every connection first asks the sentinels (in order, the first that answers)
//!   for the master's address. The userinfo is the master's credentials;
//!   `sentinel_password` the sentinels' (`${VAR}` works in both).
//! - `redis+cluster://[user:password@]host1:7000,host2:7001`: a Redis Cluster from
//!   seed nodes. Keyspace notifications are per node there, so flags follow by
//!   polling (`poll_ms`); keys written together must share a hash tag.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo as _, Pipeline, RedisFuture, Value};

use crate::config::redis_url::{self, RedisUrl};
use crate::config::{FlagsConfig, expand_env};

/// How long one Redis command (or connecting) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A Redis deployment, as `flags.redis_url` names it.
pub struct Store {
    kind: Kind,
}

enum Kind {
    Node(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

/// One connection: to a server (or the master a Sentinel named), or to a cluster.
pub enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Store {
    /// Opens (does not connect) the store `url` names: `${VAR}` expanded, and
    /// `config.tls_ca_path` as the CA for `rediss://`. An error never shows the
    /// URL's password (expanded from the environment, or written inline).
    pub fn open(url: &str, config: &FlagsConfig) -> Result<Self, String> {
        Self::open_url(url, config).map_err(|e| crate::redact::urls_in(&e))
    }

    fn open_url(url: &str, config: &FlagsConfig) -> Result<Self, String> {
        // rustls needs a process-wide crypto provider for rediss://; a second install
        // (another proxy in the same process) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = expand_env(url)?;
        let kind = match redis_url::parse(&url)? {
            RedisUrl::Node(url) => Kind::Node(node(url, config)?),
            RedisUrl::Sentinel {
                userinfo,
                sentinels,
                master,
                db,
                sentinel_password,
            } => {
                let auth = sentinel_password.map(|p| format!(":{p}"));
                let sentinels = sentinels
                    .iter()
                    .map(|h| info(auth.as_deref(), h, 0))
                    .collect::<Result<Vec<_>, _>>()?;
                // Only the master's credentials and db are taken from this: its
                // address comes from the sentinels on every connection.
                let master_settings = info(userinfo, "127.0.0.1:6379", db)?
                    .redis_settings()
                    .clone();
                let client = SentinelClient::build(
                    sentinels,
                    master,
                    Some(
                        SentinelNodeConnectionInfo::default()
                            .set_redis_connection_info(master_settings),
                    ),
                    SentinelServerType::Master,
                )
                .map_err(|e| e.to_string())?;
                Kind::Sentinel(tokio::sync::Mutex::new(client))
            }
            RedisUrl::Cluster { userinfo, seeds } => {
                let seeds = seeds
                    .iter()
                    .map(|h| info(userinfo, h, 0))
                    .collect::<Result<Vec<_>, _>>()?;
                Kind::Cluster(
                    ClusterClient::builder(seeds)
                        .connection_timeout(COMMAND_TIMEOUT)
                        .response_timeout(COMMAND_TIMEOUT)
                        .build()
                        .map_err(|e| e.to_string())?,
                )
            }
        };
        Ok(Self { kind })
    }

    /// Whether this is a Redis Cluster (no keyspace notifications to follow).
    pub const fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// A new connection whose every command gives up after [`COMMAND_TIMEOUT`]; to
    /// a Sentinel group's master as the sentinels name it now.
    pub async fn connect(&self) -> Result<Conn, redis::RedisError> {
        match &self.kind {
            Kind::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
            Kind::Node(_) | Kind::Sentinel(_) => {
                let client = self.node_client().await?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT));
                Ok(Conn::Node(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
        }
    }

    /// A client for the one server holding everything (for pub/sub): the server,
    /// or the master the sentinels name now. A cluster has none.
    pub async fn node_client(&self) -> Result<redis::Client, redis::RedisError> {
        match &self.kind {
            Kind::Node(client) => Ok(client.clone()),
            Kind::Sentinel(sentinel) => {
                let mut sentinel = sentinel.lock().await;
                tokio::time::timeout(COMMAND_TIMEOUT * 2, sentinel.async_get_client())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no sentinel named a master in time",
                        ))
                    })?
            }
            Kind::Cluster(_) => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster has no single node to subscribe on",
            ))),
        }
    }
}

fn node(url: &str, config: &FlagsConfig) -> Result<redis::Client, String> {
    match &config.tls_ca_path {
        None => redis::Client::open(url).map_err(|e| e.to_string()),
        Some(path) => {
            let root_cert = std::fs::read(path)
                .map_err(|e| format!("cannot read flags.tls_ca_path {}: {e}", path.display()))?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(|e| e.to_string())
        }
    }
}

/// `redis://[userinfo@]host/db`, parsed by redis itself (it decodes the password).
fn info(userinfo: Option<&str>, host: &str, db: i64) -> Result<redis::ConnectionInfo, String> {
    let auth = userinfo.map_or_else(String::new, |u| format!("{u}@"));
    format!("redis://{auth}{host}/{db}")
        .into_connection_info()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_opens_without_connecting() {
        let flags = FlagsConfig::default();
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/2",
            "redis+sentinel://:secret@127.0.0.1:26379/mymaster?sentinel_password=s3",
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        ] {
            assert!(Store::open(url, &flags).is_ok(), "{url}");
        }
        assert!(
            Store::open("redis+cluster://127.0.0.1:7000", &flags)
                .unwrap()
                .is_cluster()
        );
        let error = Store::open("redis+sentinel://h:1", &flags)
            .err()
            .unwrap_or_default();
        assert!(error.contains("needs the master's name"), "{error}");
    }
}
