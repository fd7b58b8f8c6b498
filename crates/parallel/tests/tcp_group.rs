//! The TCP backend with real sockets on loopback (ranks as threads here; the CLI tests run
//! them as processes): rendezvous checks, collective results, and failure modes (a silent
//! rank times out, a dead rank is a disconnect, both well inside their deadlines).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{Device, Tensor};
use dsvl_parallel::rendezvous::{join, lead, GroupSpec};
use dsvl_parallel::{CommError, Communicator, GroupKey, LinkSet, TcpCommunicator};

/// The key every rank of these groups holds.
static KEY: std::sync::LazyLock<GroupKey> = std::sync::LazyLock::new(GroupKey::random);

fn spec(world: usize, rank: usize, addr: &str, tag: &str) -> GroupSpec {
    GroupSpec {
        world_size: world,
        rank,
        leader_addr: addr.to_string(),
        rendezvous_timeout: Duration::from_secs(10),
        collective_timeout: Duration::from_secs(2),
        tag: tag.into(),
        key: Some(KEY.clone()),
    }
}

/// Forms a group of `world` ranks and runs `body(rank, comm)` on each in its own thread.
fn with_group<T: Send + 'static>(
    world: usize,
    body: impl Fn(usize, TcpCommunicator) -> T + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let body = Arc::new(body);
    let mut handles = Vec::new();
    for rank in 1..world {
        let (addr, body) = (addr.clone(), body.clone());
        handles.push(std::thread::spawn(move || {
            let (links, _) = join(&spec(world, rank, &addr, "t")).expect("join");
            body(rank, TcpCommunicator::new(Arc::new(links), Duration::from_secs(2)))
        }));
    }
    let links = lead(&listener, &spec(world, 0, &addr, "t"), serde_json::json!({}))?;
    let mut out = vec![body(0, TcpCommunicator::new(Arc::new(links), Duration::from_secs(2)))];
    for h in handles {
        out.push(h.join().expect("rank thread"));
    }
    Ok(out)
}

#[test]
fn all_reduce_and_all_gather_agree_on_every_rank() -> Result<()> {
    let results = with_group(4, |rank, comm| {
        let x = Tensor::new(&[rank as f32, 1.0, 10.0 * rank as f32], &Device::Cpu).unwrap();
        let sum = comm.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
        let gathered = comm
            .all_gather_last_dim(&x.reshape((1, 3)).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        (comm.rank(), comm.world_size(), sum, gathered)
    })?;
    for (rank, world, sum, gathered) in results {
        assert_eq!(world, 4);
        assert_eq!(sum, vec![6.0, 4.0, 60.0], "rank {rank}");
        assert_eq!(
            gathered[0],
            vec![0., 1., 0., 1., 1., 10., 2., 1., 20., 3., 1., 30.],
            "rank {rank}"
        );
    }
    Ok(())
}

#[test]
fn rendezvous_refuses_a_mismatched_tag() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let a = addr.clone();
    let worker = std::thread::spawn(move || {
        join(&spec(2, 1, &a, "other-model")).err().map(|e| e.to_string())
    });
    let err = lead(&listener, &spec(2, 0, &addr, "t"), serde_json::json!({}))
        .err()
        .expect("mismatch refused");
    assert!(err.to_string().contains("group tag"), "{err}");
    let worker_err = worker.join().unwrap().expect("worker told why");
    assert!(worker_err.contains("group tag"), "{worker_err}");
    Ok(())
}

#[test]
fn rendezvous_times_out_when_a_rank_never_comes() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let mut s = spec(3, 0, &addr, "t");
    s.rendezvous_timeout = Duration::from_millis(500);
    let t = Instant::now();
    let err = lead(&listener, &s, serde_json::json!({})).err().expect("timeout");
    assert!(err.to_string().contains("ranks [1, 2] did not join"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3));
    Ok(())
}

/// A rank that stops participating makes the others fail with a timeout, not hang; a rank
/// that exits makes them fail at once with a disconnect.
#[test]
fn silent_rank_times_out_and_dead_rank_disconnects() -> Result<()> {
    let results = with_group(3, |rank, comm| {
        let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        comm.all_reduce_sum(&x).unwrap(); // everyone healthy once
        match rank {
            2 => {
                // Rank 2 hangs (never calls the collective) for longer than the deadline.
                std::thread::sleep(Duration::from_secs(4));
                None
            }
            _ => {
                let t = Instant::now();
                let err = comm.all_reduce_sum(&x).err();
                Some((err, t.elapsed()))
            }
        }
    })?;
    // The leader waits on rank 1 (fine) and rank 2 (silent): timeout after ~2 s.
    let (err, took) = results[0].as_ref().expect("leader result");
    assert!(matches!(err, Some(CommError::Timeout { rank: 2, .. })), "{err:?}");
    assert!(*took < Duration::from_secs(4), "{took:?}");
    // Rank 1 waits for the leader's reply; the leader gave up, so it times out too (bounded).
    let (err, took) = results[1].as_ref().expect("rank 1 result");
    assert!(err.is_some() && *took < Duration::from_secs(5), "{err:?} {took:?}");

    let results = with_group(2, |rank, comm| {
        let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        if rank == 1 {
            drop(comm); // the process "dies": its socket closes
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        Some((comm.all_reduce_sum(&x).err(), t.elapsed()))
    })?;
    let (err, took) = results[0].as_ref().expect("leader");
    assert!(matches!(err, Some(CommError::Disconnected { rank: 1, .. })), "{err:?}");
    assert!(*took < Duration::from_millis(500), "{took:?}");
    Ok(())
}

#[test]
fn single_rank_group_needs_no_network() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let links = lead(&listener, &spec(1, 0, "unused", "t"), serde_json::json!({}))?;
    assert!(matches!(links, LinkSet::Single));
    Ok(())
}
