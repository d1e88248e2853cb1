//! Connecting: what happens when there is no cluster, or the key is wrong.
//! Only `wrong_user_is_refused` needs the test cluster (CEPH_CONF).

mod common;

use std::time::{Duration, Instant};

use tpl_ceph::{Cluster, ConnectOptions, Error};

fn temp_conf(tag: &str, body: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("tpl-ceph-{tag}-{}.conf", std::process::id()));
    std::fs::write(&p, body).unwrap();
    p
}

/// A monitor address where nothing listens (a port just released).
fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    format!("v1:{a}")
}

#[test]
fn a_dead_cluster_fails_after_the_timeout_instead_of_hanging() {
    let conf = temp_conf(
        "dead",
        &format!(
            "[global]\nmon_host = {}\nauth_client_required = none\n",
            dead_addr()
        ),
    );
    let t0 = Instant::now();
    let r = Cluster::connect(
        &ConnectOptions::default()
            .conf(&conf)
            .timeout(Duration::from_secs(3)),
    );
    let took = t0.elapsed();
    let _ = std::fs::remove_file(&conf);
    let e = r.unwrap_err();
    println!("dead cluster: {took:?}: {e}");
    assert!(matches!(e, Error::TimedOut { .. }), "{e:?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("ETIMEDOUT")
            && msg.contains("mon_host")
            && msg.contains(&conf.display().to_string()),
        "{msg}"
    );
}

#[test]
fn a_conf_without_monitors_says_so() {
    let conf = temp_conf("nomon", "[global]\nauth_client_required = none\n");
    let r = Cluster::connect(&ConnectOptions::default().conf(&conf));
    let _ = std::fs::remove_file(&conf);
    let e = r.unwrap_err();
    println!("no mon_host: {e}");
    assert!(e.to_string().contains("no monitor address"), "{e}");
}

#[test]
fn a_missing_conf_file_is_not_found() {
    let e = Cluster::connect(&ConnectOptions::default().conf("/nonexistent/tpl-ceph.conf"))
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/tpl-ceph.conf"), "{e}");
}

#[test]
fn wrong_user_is_refused() {
    // needs the real cluster: its mon_host, a user that has no key there
    let _ = common::connect();
    let conf = std::env::var("CEPH_CONF").unwrap();
    let keyring = temp_conf(
        "keyring",
        // a well-formed key that the cluster does not know
        "[client.tplt-nobody]\n\tkey = AQBLk1Bn0Y7lGxAAw4d+3cEn3sPAL5EJwiV8Vw==\n",
    );
    let r = Cluster::connect(
        &ConnectOptions::default()
            .conf(&conf)
            .user("client.tplt-nobody")
            .keyring(&keyring)
            .timeout(Duration::from_secs(5)),
    );
    let _ = std::fs::remove_file(&keyring);
    let e = r.unwrap_err();
    println!("unknown user: {e}");
    assert!(matches!(e, Error::PermissionDenied { .. }), "{e:?}");
    assert!(e.to_string().contains("client.tplt-nobody"), "{e}");
}
