//! The Ansible content, run for real: ansible-lint (production profile) and syntax
//! checks; site.yml against localhost in a prefix this test owns, with the service
//! steps as plain processes (`canarygate_service_manager: process`), the installed
//! proxy then serving through the installed apps, and a second run changing nothing;
//! deploy.yml promoting a good canary and failing on a bad one (the analysis rolls
//! it back); provision.yml against moto's EC2 endpoint.
//!
//! Ansible comes from the virtualenv `./test` makes (target/ansible-venv). Every
//! process the playbooks start has a PID file in the prefix; they are killed by PID.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;

fn venv(bin: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/ansible-venv/bin")
        .join(bin);
    assert!(
        path.exists(),
        "{} is missing: ./test makes the virtualenv (pinned ansible, ansible-lint, boto3)",
        path.display()
    );
    path
}

fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ansible")
}

/// Runs an Ansible command in ansible/ with its caches and temp files in `home`.
fn run(bin: &str, args: &[&str], home: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(venv(bin))
        .args(args)
        .current_dir(ansible_dir())
        .env("ANSIBLE_HOME", home.join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", home.join("ansible-tmp"))
        .env("ANSIBLE_REMOTE_TEMP", home.join("ansible-tmp"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv("python").parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn ansible_lint_passes_with_the_production_profile_and_every_playbook_parses() {
    within(300, async {
        let home = TempDir::new("ansible-lint");
        let lint = run(
            "ansible-lint",
            &["--offline", "--profile", "production"],
            &home.0,
            &[],
        );
        assert!(lint.status.success(), "{}", text(&lint));
        assert!(
            text(&lint).contains("Profile 'production' was required, and it passed"),
            "{}",
            text(&lint)
        );
        for playbook in ["site.yml", "deploy.yml", "provision.yml"] {
            let check = run(
                "ansible-playbook",
                &[
                    "--syntax-check",
                    "-i",
                    "inventory/example/hosts.yml",
                    playbook,
                ],
                &home.0,
                &[],
            );
            assert!(check.status.success(), "{playbook}: {}", text(&check));
        }
    })
    .await;
}

/// The prefix the playbooks install into, and the processes they start there.
struct Site {
    dir: TempDir,
    root: PathBuf,
    inventory: PathBuf,
    proxy: u16,
    admin: u16,
    redis: u16,
}

impl Site {
    fn new() -> Self {
        let dir = TempDir::new("ansible-site");
        let root = dir.0.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let (proxy, admin, redis) = (free_port(), free_port(), free_port());
        let apps = [free_port(), free_port(), free_port()];
        let inventory = dir.write(
            "hosts.yml",
            &format!(
                "all:\n  vars:\n    ansible_connection: local\n    ansible_python_interpreter: {python}\n\
                 \x20   canarygate_root: {root}\n    canarygate_service_manager: process\n\
                 \x20   canarygate_manage_users: false\n    canarygate_become: false\n\
                 \x20   canarygate_binary_src: {bin}\n    canarygate_listen: \"127.0.0.1:{proxy}\"\n\
                 \x20   canarygate_admin_listen: \"127.0.0.1:{admin}\"\n    canarygate_redis_port: {redis}\n\
                 \x20   redis_port: {redis}\n    redis_password: s3cret\n    canarygate_redis_password: s3cret\n\
                 \x20   canarygate_sticky_secret: sticky-s3cret-of-the-fleet\n\
                 \x20   canarygate_analysis_interval_ms: 500\n    canarygate_analysis_window_ms: 6000\n\
                 \x20   canarygate_analysis_min_requests: 20\n    canarygate_analysis_steps: [20, 50]\n\
                 \x20   canarygate_analysis_step_ms: 2000\n    app_drain_ms: 4000\n\
                 \x20 children:\n    proxy:\n      hosts:\n        proxy-1: {{ansible_host: 127.0.0.1}}\n\
                 \x20   production:\n      hosts:\n        production-1: {{ansible_host: 127.0.0.1, app_port: {a0}}}\n\
                 \x20       production-2: {{ansible_host: 127.0.0.1, app_port: {a1}}}\n\
                 \x20   canary:\n      hosts:\n        canary-1: {{ansible_host: 127.0.0.1, app_port: {a2}}}\n\
                 \x20   redis:\n      hosts:\n        redis-1: {{ansible_host: 127.0.0.1}}\n",
                python = venv("python").display(),
                root = root.display(),
                bin = binary(),
                a0 = apps[0],
                a1 = apps[1],
                a2 = apps[2],
            ),
        );
        Self {
            dir,
            root,
            inventory,
            proxy,
            admin,
            redis,
        }
    }

    fn playbook(&self, playbook: &str, extra: &[&str]) -> (bool, String) {
        let mut args = vec!["-i", self.inventory.to_str().unwrap(), playbook];
        args.extend_from_slice(extra);
        let out = run("ansible-playbook", &args, &self.dir.0, &[]);
        (out.status.success(), text(&out))
    }

    fn redis_cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis.to_string()])
            .args(args)
            .env("REDISCLI_AUTH", "s3cret")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Every process the playbooks started has its PID file here.
        let run = self.root.join("run/canarygate");
        for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Ok(pid) = std::fs::read_to_string(entry.path())
            {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
}

/// The `changed=` counts of a play recap, one per host.
fn changed_counts(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter(|l| l.contains(" : ok="))
        .filter_map(|l| l.split("changed=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Which app answered, with the override header.
async fn version_of(c: &TestClient, proxy: u16, pool: &str) -> String {
    let got = get(
        c,
        &format!("http://127.0.0.1:{proxy}/"),
        &[(
            "x-canary",
            if pool == "canary" { "always" } else { "never" },
        )],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.text()
        .split("<h1>Hello from ")
        .nth(1)
        .and_then(|rest| rest.split("</h1>").next())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_installs_a_serving_stack_idempotently_and_deploy_promotes_or_rolls_back() {
    within(600, async {
        let site = Site::new();
        let (ok, out) = site.playbook("site.yml", &[]);
        assert!(ok, "{out}");
        let c = client();
        eventually(
            Duration::from_secs(20),
            "the installed proxy serves",
            || async {
                try_get(&c, &format!("http://127.0.0.1:{}/", site.proxy))
                    .await
                    .is_ok_and(|g| g.status == 200)
            },
        )
        .await;
        let ready = get(&c, &format!("http://127.0.0.1:{}/readyz", site.admin), &[]).await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        assert_eq!(
            version_of(&c, site.proxy, "production").await,
            "production (v1)"
        );
        assert_eq!(version_of(&c, site.proxy, "canary").await, "canary (v1)");
        let config =
            std::fs::read_to_string(site.root.join("etc/canarygate/canarygate.toml")).unwrap();
        assert!(
            config.contains("redis_url = \"redis://:${CANARYGATE_REDIS_PASSWORD}@"),
            "{config}"
        );
        assert!(!config.contains("s3cret"), "no secret in the config");
        assert!(
            config.contains("sticky_secret_env = \"CANARYGATE_STICKY_SECRET\""),
            "{config}"
        );
        // The proxy's own secrets file, readable by its owner only.
        let env_file = site.root.join("etc/canarygate/canarygate.env");
        let secrets = std::fs::read_to_string(&env_file).unwrap();
        assert!(
            secrets.contains("CANARYGATE_REDIS_PASSWORD=s3cret\n")
                && secrets.contains("CANARYGATE_STICKY_SECRET=sticky-s3cret-of-the-fleet\n"),
            "{secrets}"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&env_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second run changes nothing.
        let (ok, again) = site.playbook("site.yml", &[]);
        assert!(ok, "{again}");
        let changed = changed_counts(&again);
        assert_eq!(changed.len(), 5, "{again}");
        assert!(changed.iter().all(|c| *c == 0), "{again}");

        // Traffic for the analysis, through the whole deploys.
        let stop = tokio_util::sync::CancellationToken::new();
        let load = {
            let stop = stop.clone();
            let url = format!("http://127.0.0.1:{}/", site.proxy);
            tokio::spawn(async move {
                // Users from 32 addresses: the analysis counts one client's requests
                // only up to a small share of a window.
                let users: Vec<_> = (1..=32u8)
                    .map(|u| client_from([127, 3, 0, u].into()))
                    .collect();
                let mut failed = 0u32;
                for c in users.iter().cycle() {
                    if stop.is_cancelled() {
                        break;
                    }
                    match try_get(c, &url).await {
                        Ok(g)
                            if g.status.as_u16() < 500
                                || g.text().contains("demo app is broken") => {}
                        _ => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                failed
            })
        };
        let fast = [
            "-e",
            "deploy_verdict_delay=1",
            "-e",
            "deploy_verdict_retries=90",
        ];
        // A good release: the canary first, the analysis says healthy, then production
        // one host at a time, then the split is reset.
        let mut args = vec!["-e", "app_version=v2"];
        args.extend_from_slice(&fast);
        let (ok, out) = site.playbook("deploy.yml", &args);
        assert!(ok, "{out}");
        assert_eq!(version_of(&c, site.proxy, "canary").await, "canary (v2)");
        assert_eq!(
            version_of(&c, site.proxy, "production").await,
            "production (v2)"
        );
        assert!(
            out.contains("\"msg\": \"canary healthy: canary healthy at 50%"),
            "{out}"
        );
        // The split reset; the analysis rests (canary_auto off) until the next deploy.
        let flags = site.redis_cli(&["HGETALL", "canarygate:flags"]);
        assert!(flags.contains("canary_percent\n33\n"), "{flags}");
        assert!(flags.contains("canary_auto\noff\n"), "{flags}");

        // A bad release: rolled back by the analysis, the play fails with the reason,
        // production stays on v2.
        let mut args = vec!["-e", "app_version=v3", "-e", "app_broken=true"];
        args.extend_from_slice(&fast);
        let (ok, out) = site.playbook("deploy.yml", &args);
        assert!(!ok, "{out}");
        assert!(
            out.contains("canary rolled_back: canary error ratio"),
            "{out}"
        );
        assert_eq!(
            version_of(&c, site.proxy, "production").await,
            "production (v2)"
        );
        let flags = site.redis_cli(&["HGETALL", "canarygate:flags"]);
        assert!(flags.contains("canary_percent\n0\n"), "{flags}");
        stop.cancel();
        let failed = load.await.unwrap();
        // Production hosts restarted one at a time, each drained first: no request
        // failed but the broken canary's own 500s.
        assert_eq!(failed, 0, "requests failed during the deploys");
    })
    .await;
}

#[tokio::test]
async fn provision_creates_the_groups_instances_on_an_ec2_endpoint_and_writes_the_inventory() {
    within(180, async {
        let home = TempDir::new("ansible-provision");
        let port = free_port();
        let _moto = KillOnDrop(Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]')"));
        wait_port(port).await;
        let endpoint = format!("http://127.0.0.1:{port}");
        let aws = [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ];
        let boto = |code: &str| -> String {
            let out = Command::new(venv("python"))
                .arg("-c")
                .arg(format!(
                    "import boto3, json\nc = boto3.client('ec2', endpoint_url='{endpoint}', \
                     region_name='eu-west-1')\n{code}"
                ))
                .envs(aws)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let ami = boto("print(c.describe_images()['Images'][0]['ImageId'])");
        boto("c.create_key_pair(KeyName='ops')");
        let inventory = home.0.join("hosts.yml");
        let out = run(
            "ansible-playbook",
            &[
                "provision.yml",
                "-e",
                &format!("provision_endpoint_url={endpoint}"),
                "-e",
                &format!("provision_ami={ami}"),
                "-e",
                "provision_key_name=ops",
                "-e",
                &format!("provision_inventory={}", inventory.display()),
            ],
            &home.0,
            &aws,
        );
        assert!(out.status.success(), "{}", text(&out));
        // The instances, by their group tag, with their types.
        let running = boto(
            "r = c.describe_instances(Filters=[{'Name': 'instance-state-name', 'Values': ['running']}])\n\
             print(json.dumps(sorted([(t['Value'], i['InstanceType'], i['PrivateIpAddress']) \
             for x in r['Reservations'] for i in x['Instances'] for t in i.get('Tags', []) \
             if t['Key'] == 'canarygate_group'])))",
        );
        let running: Vec<(String, String, String)> = serde_json::from_str(&running).unwrap();
        let groups: Vec<(&str, &str)> = running
            .iter()
            .map(|(g, t, _)| (g.as_str(), t.as_str()))
            .collect();
        assert_eq!(
            groups,
            [
                ("canary", "t3.small"),
                ("production", "t3.small"),
                ("production", "t3.small"),
                ("proxy", "t3.small"),
                ("redis", "t3.micro")
            ]
        );
        // The inventory has each instance, by address, in its group.
        let written = std::fs::read_to_string(&inventory).unwrap();
        for (_, _, ip) in &running {
            assert!(written.contains(&format!("ansible_host: {ip}")), "{written}");
        }
        let parse = run(
            "ansible-inventory",
            &["-i", inventory.to_str().unwrap(), "--list"],
            &home.0,
            &[],
        );
        assert!(parse.status.success(), "{}", text(&parse));
        let list: serde_json::Value = serde_json::from_slice(&parse.stdout).unwrap();
        for (group, count) in [("proxy", 1), ("production", 2), ("canary", 1), ("redis", 1)] {
            assert_eq!(
                list[group]["hosts"].as_array().map_or(0, Vec::len),
                count,
                "{group}: {list}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_post_commit_hook_triggers_the_jenkins_build_of_the_branch() {
    within(60, async {
        let jenkins = Peer::start(Mode::Created).await;
        let repo = TempDir::new("hook-repo");
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .args(args)
                .current_dir(&repo.0)
                .env("JENKINS_URL", format!("{}/job/canarygate", jenkins.url()))
                .env("JENKINS_AUTH", "ci:token123")
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
            text(&out)
        };
        git(&["init", "-q", "-b", "main"]);
        // The README's one-liner, pointed at this checkout's hooks.
        let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join(".githooks");
        git(&["config", "core.hooksPath", hooks.to_str().unwrap()]);
        std::fs::write(repo.0.join("f"), "x").unwrap();
        git(&["add", "f"]);
        let out = git(&["commit", "-q", "-m", "first"]);
        assert!(out.contains("Jenkins build of main triggered"), "{out}");
        let got = jenkins.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, "/job/canarygate/job/main/build");
        // Basic auth with the user and API token.
        assert_eq!(got[0].authorization, "Basic Y2k6dG9rZW4xMjM=");
    })
    .await;
}

#[tokio::test]
async fn the_systemd_units_pass_systemd_analyze_verify_with_least_privilege() {
    within(120, async {
        let home = TempDir::new("ansible-units");
        let units = home.0.join("units");
        let root = home.0.join("root");
        std::fs::create_dir_all(&units).unwrap();
        // The units' ExecStart must point at an executable for verify.
        let bin = root.join("usr/local/bin/canarygate");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(binary(), &bin).unwrap();
        let out = run(
            "ansible-playbook",
            &[
                "tests/render_units.yml",
                "-e",
                &format!("render_dir={}", units.display()),
                "-e",
                &format!("canarygate_root={}", root.display()),
            ],
            &home.0,
            &[],
        );
        assert!(out.status.success(), "{}", text(&out));
        let unit = |name: &str| std::fs::read_to_string(units.join(name)).unwrap();
        let proxy = unit("canarygate.service");
        for line in [
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "UMask=0007",
        ] {
            assert!(proxy.contains(line), "{line}: {proxy}");
        }
        assert!(!proxy.contains("CAP_KILL"), "{proxy}");
        let doctor = unit("canarygate-doctor.service");
        assert!(
            doctor.contains("AmbientCapabilities=CAP_KILL\n"),
            "{doctor}"
        );
        let maintenance = unit("canarygate-maintenance.service");
        assert!(
            maintenance
                .contains("AmbientCapabilities=CAP_LEASE\nCapabilityBoundingSet=CAP_LEASE\n"),
            "{maintenance}"
        );
        assert!(
            maintenance.contains("ReadWritePaths=/var/log/canarygate /var/backups/canarygate\n"),
            "{maintenance}"
        );
        assert!(unit("canarygate-app.service").contains("--drain-ms 3000"));
        // Only the proxy holds the Redis password and the cookie key; every service
        // may send alerts.
        let proxy_env = unit("canarygate.env");
        assert!(
            proxy_env.contains("CANARYGATE_REDIS_PASSWORD=redis-s3cret\n"),
            "{proxy_env}"
        );
        assert!(
            proxy_env.contains("CANARYGATE_STICKY_SECRET=sticky-s3cret\n"),
            "{proxy_env}"
        );
        for name in ["canarygate-doctor.env", "canarygate-maintenance.env"] {
            let env = unit(name);
            assert!(
                !env.contains("redis-s3cret") && !env.contains("sticky-s3cret"),
                "{env}"
            );
            assert!(
                env.contains("CANARYGATE_WEBHOOK_URL=https://hooks.example/"),
                "{env}"
            );
        }
        // Each service reads a secrets file of its own (only what it needs).
        for name in ["canarygate", "canarygate-doctor", "canarygate-maintenance"] {
            let expected = format!(
                "EnvironmentFile={}/etc/canarygate/{name}.env\n",
                root.display()
            );
            assert!(
                unit(&format!("{name}.service")).contains(&expected),
                "{name}"
            );
        }
        // Issue 29: no unit is left at systemd's default soft limit of 1024.
        for name in [
            "canarygate.service",
            "canarygate-doctor.service",
            "canarygate-maintenance.service",
            "canarygate-app.service",
        ] {
            assert!(unit(name).contains("LimitNOFILE=65536\n"), "{name}");
        }
        // systemd's own check of every directive (no systemd needs to run).
        let names = [
            "canarygate.service",
            "canarygate-doctor.service",
            "canarygate-maintenance.service",
            "canarygate-app.service",
        ];
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .args(names.iter().map(|n| units.join(n)))
            .output()
            .expect("systemd-analyze (Debian's systemd package)");
        let said = text(&verify);
        assert!(verify.status.success(), "{said}");
        assert!(!said.contains("canarygate"), "{said}");
    })
    .await;
}
