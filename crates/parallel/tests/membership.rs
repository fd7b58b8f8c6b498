//! Strangers on the rendezvous port: connections that stall, send garbage, announce huge
//! frames, or hold the wrong key are dropped without delaying or aborting the group, and never
//! see the welcome's `extra` (where the NCCL unique id travels). Workers refuse a leader that
//! cannot prove it holds the group key.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;
use dsvl_parallel::rendezvous::{join, lead, GroupSpec};
use dsvl_parallel::{GroupKey, LinkSet, Message};
use serde_json::json;

fn spec(world: usize, rank: usize, addr: &str, key: Option<GroupKey>) -> GroupSpec {
    GroupSpec {
        world_size: world,
        rank,
        leader_addr: addr.to_string(),
        rendezvous_timeout: Duration::from_secs(20),
        collective_timeout: Duration::from_secs(2),
        tag: "t".into(),
        key,
    }
}

/// Reads everything a stranger is sent until the leader closes the connection (or 10 s).
fn drain(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn strangers_are_dropped_and_the_group_forms_anyway() -> Result<()> {
    let key = GroupKey::random();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let secret_extra = json!({"nccl_id": "only-for-members-0123456789"});

    // Strangers connect first: one stays silent, one sends garbage, one announces a 4 GiB
    // header, one says hello as rank 1 with a forged proof, one holds another key.
    let silent = TcpStream::connect(&addr)?;
    let mut garbage = TcpStream::connect(&addr)?;
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut huge = TcpStream::connect(&addr)?;
    huge.write_all(b"DSVL")?;
    huge.write_all(&u32::MAX.to_le_bytes())?;
    let mut forged = TcpStream::connect(&addr)?;
    let hello = json!({"kind": "hello", "version": 2, "rank": 1, "world_size": 2, "tag": "t",
        "nonce": "00".repeat(32), "proof": "11".repeat(32)});
    Message::new(hello).write_to(&mut forged)?;
    let a = addr.clone();
    let wrong_key = std::thread::spawn(move || join(&spec(2, 1, &a, Some(GroupKey::random()))));
    std::thread::sleep(Duration::from_millis(200));

    // The member joins after all of them, and the group forms without waiting them out.
    let a = addr.clone();
    let k = key.clone();
    let member = std::thread::spawn(move || join(&spec(2, 1, &a, Some(k))));
    let t = Instant::now();
    let links = lead(&listener, &spec(2, 0, &addr, Some(key)), secret_extra.clone())?;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the strangers stalled the group: {:?}",
        t.elapsed()
    );
    assert!(matches!(links, LinkSet::Leader { ref workers } if workers.len() == 1));
    let (_, extra) = member.join().expect("member thread")?;
    assert_eq!(extra, secret_extra, "the member reads the sealed extra");

    // Nobody else was welcomed or learned the extra.
    let err = wrong_key.join().expect("thread").err().expect("the wrong key is refused");
    assert!(!err.to_string().is_empty());
    for s in [silent, garbage, huge, forged] {
        let seen = String::from_utf8_lossy(&drain(s)).into_owned();
        assert!(!seen.contains("welcome") && !seen.contains("only-for-members"), "{seen}");
    }
    Ok(())
}

#[test]
fn a_worker_refuses_a_leader_without_the_key() -> Result<()> {
    // An impostor leader with another key: the worker refuses its welcome.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let a = addr.clone();
    let impostor = std::thread::spawn(move || {
        let mut s = spec(2, 0, &a, Some(GroupKey::random()));
        s.rendezvous_timeout = Duration::from_secs(3);
        lead(&listener, &s, json!({"plan": "evil"})).map(|_| ())
    });
    let err = join(&spec(2, 1, &addr, Some(GroupKey::random()))).err().expect("refused");
    assert!(err.to_string().contains("same group key"), "{err}");
    let _ = impostor.join();

    // A keyless worker and a keyed leader (or the reverse) say what is wrong, both ways.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let a = addr.clone();
    let keyed = std::thread::spawn(move || {
        let mut s = spec(2, 0, &a, Some(GroupKey::random()));
        s.rendezvous_timeout = Duration::from_secs(2);
        lead(&listener, &s, json!({})).map(|_| ())
    });
    let err = join(&spec(2, 1, &addr, None)).err().expect("refused");
    assert!(err.to_string().contains("requires members to prove"), "{err}");
    assert!(keyed.join().expect("thread").is_err(), "the leader is still missing rank 1");

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let a = addr.clone();
    let open = std::thread::spawn(move || {
        let mut s = spec(2, 0, &a, None);
        s.rendezvous_timeout = Duration::from_secs(2);
        lead(&listener, &s, json!({})).map(|_| ())
    });
    let err = join(&spec(2, 1, &addr, Some(GroupKey::random()))).err().expect("refused");
    assert!(err.to_string().contains("without a group key"), "{err}");
    let _ = open.join();
    Ok(())
}

#[test]
fn a_flood_of_connections_is_capped_and_the_group_still_forms() -> Result<()> {
    let key = GroupKey::random();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    // More silent connections than the leader handshakes at once (64), fewer than the
    // listen backlog (so connecting does not block before the leader runs).
    let flood: Vec<TcpStream> = (0..100).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
    assert_eq!(flood.len(), 100);
    let (a, k) = (addr.clone(), key.clone());
    let member = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        join(&spec(2, 1, &a, Some(k)))
    });
    let t = Instant::now();
    lead(&listener, &spec(2, 0, &addr, Some(key)), json!({}))?;
    member.join().expect("member")?;
    // The silent flood holds at most 64 handshakes for 5 s; the member got through at once
    // or, at worst, as soon as they timed out.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    Ok(())
}

#[test]
fn a_trickling_stranger_is_cut_off_after_the_handshake_time() -> Result<()> {
    // One byte every 300 ms never trips a per-read timeout; the handshake's total time does.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let a = addr.clone();
    let leader = std::thread::spawn(move || {
        let mut s = spec(2, 0, &a, Some(GroupKey::random()));
        s.rendezvous_timeout = Duration::from_secs(12);
        lead(&listener, &s, json!({})).map(|_| ())
    });
    let mut trickle = TcpStream::connect(&addr)?;
    // A well-formed start (magic, a 60,000-byte header announced), then the header trickles.
    trickle.write_all(b"DSVL")?;
    trickle.write_all(&60_000u32.to_le_bytes())?;
    let t = Instant::now();
    let cut_after = loop {
        if trickle.write_all(b"D").is_err() || t.elapsed() > Duration::from_secs(11) {
            break t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(cut_after < Duration::from_secs(9), "held for {cut_after:?}");
    assert!(leader.join().expect("leader").is_err(), "rank 1 never came");
    Ok(())
}
