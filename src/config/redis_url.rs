//! `flags.redis_url`'s forms, parsed without connecting (pure: checked at load, and
//! again after `${VAR}` expansion when the store is opened).
//!
//! - `redis://...`, `rediss://...`: one server (redis-rs parses the rest).
//! - `redis+sentinel://[user:password@]host:port[,host:port...]/<master>[/db][?sentinel_password=...]`
//! - `redis+cluster://[user:password@]host:port[,host:port...]`

/// What a `redis_url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisUrl<'a> {
    /// `redis://` or `rediss://`: the whole URL.
    Node(&'a str),
    Sentinel {
        /// The master's credentials (`user:password`, as written).
        userinfo: Option<&'a str>,
        sentinels: Vec<&'a str>,
        master: &'a str,
        db: i64,
        sentinel_password: Option<&'a str>,
    },
    Cluster {
        userinfo: Option<&'a str>,
        seeds: Vec<&'a str>,
    },
}

/// The schemes, for messages.
pub const SCHEMES: &str = "redis://, rediss://, redis+sentinel:// or redis+cluster://";

/// Parses `url`; the error says what is wrong.
pub fn parse(url: &str) -> Result<RedisUrl<'_>, String> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(RedisUrl::Node(url));
    }
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        let p = parts(rest)?;
        let Some(master) = p.path.first().copied() else {
            return Err(
                "needs the master's name: redis+sentinel://host:port,.../mymaster/0".to_owned(),
            );
        };
        let db = p.path.get(1).copied().unwrap_or("0");
        let db = db
            .parse::<i64>()
            .map_err(|_| format!("database {db:?} is not a number"))?;
        let mut sentinel_password = None;
        for (name, value) in p.query {
            match name {
                "sentinel_password" => sentinel_password = Some(value),
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (only sentinel_password)"
                    ));
                }
            }
        }
        return Ok(RedisUrl::Sentinel {
            userinfo: p.userinfo,
            sentinels: p.hosts,
            master,
            db,
            sentinel_password,
        });
    }
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        let p = parts(rest)?;
        if !p.path.is_empty() || !p.query.is_empty() {
            return Err(
                "takes no database or parameters: redis+cluster://host:port,...".to_owned(),
            );
        }
        return Ok(RedisUrl::Cluster {
            userinfo: p.userinfo,
            seeds: p.hosts,
        });
    }
    Err(format!("must start with {SCHEMES}"))
}

/// The hash tag of `key` (`{...}`, as Redis Cluster slots it), if it has one.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

/// The parts of `[userinfo@]host:port,host:port[/path][?query]`.
struct Parts<'a> {
    userinfo: Option<&'a str>,
    hosts: Vec<&'a str>,
    path: Vec<&'a str>,
    query: Vec<(&'a str, &'a str)>,
}

fn parts(rest: &str) -> Result<Parts<'_>, String> {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        return Err("names no host (host:port,host:port...)".to_owned());
    }
    if let Some(bad) = hosts.iter().find(|h| {
        h.rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    }) {
        return Err(format!("host {bad:?} needs a port"));
    }
    Ok(Parts {
        userinfo,
        hosts,
        path: path.split('/').filter(|p| !p.is_empty()).collect(),
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_parses_and_bad_ones_say_why() {
        assert_eq!(
            parse("redis://127.0.0.1:6379/0"),
            Ok(RedisUrl::Node("redis://127.0.0.1:6379/0"))
        );
        assert_eq!(
            parse("redis+sentinel://:${PW}@h1:26379,h2:26380/mymaster/2?sentinel_password=${SPW}"),
            Ok(RedisUrl::Sentinel {
                userinfo: Some(":${PW}"),
                sentinels: vec!["h1:26379", "h2:26380"],
                master: "mymaster",
                db: 2,
                sentinel_password: Some("${SPW}"),
            })
        );
        assert_eq!(
            parse("redis+cluster://h1:7000,h2:7001"),
            Ok(RedisUrl::Cluster {
                userinfo: None,
                seeds: vec!["h1:7000", "h2:7001"],
            })
        );
        for (bad, why) in [
            ("http://x", "must start with redis://"),
            ("redis+sentinel://h:26379", "needs the master's name"),
            (
                "redis+sentinel://h:26379/m/x",
                "database \"x\" is not a number",
            ),
            ("redis+sentinel:///m", "names no host"),
            ("redis+sentinel://host/m", "host \"host\" needs a port"),
            (
                "redis+sentinel://h:1/m?password=x",
                "unknown parameter \"password\"",
            ),
            ("redis+cluster://h:1/0", "takes no database"),
            ("redis+cluster://h:x", "host \"h:x\" needs a port"),
        ] {
            let error = parse(bad).err().unwrap_or_default();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn hash_tags_as_redis_cluster_reads_them() {
        assert_eq!(hash_tag("{canarygate}:flags"), Some("canarygate"));
        assert_eq!(hash_tag("a{b}c{d}"), Some("b"));
        assert_eq!(hash_tag("canarygate:flags"), None);
        assert_eq!(hash_tag("{}x"), None);
        assert_eq!(hash_tag("x{y"), None);
    }
}
