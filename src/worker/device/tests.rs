use super::*;

#[test]
fn a_shard_ends_once_when_its_last_row_is_in_and_its_writer_closes() {
    let (tx, mut rx) = mpsc::channel(4);
    let (shard, mut heard) = ShardHandle::new(2, Arc::new(AtomicBool::new(false)), tx);
    let img = || DynamicImage::new_luma8(1, 1);
    shard.deliver((7, img()));
    assert!(heard.try_recv().is_err(), "one row is still due");
    shard.deliver((8, img()));
    assert!(matches!(heard.try_recv(), Ok(Sampled::Done { .. })));
    assert_eq!(rx.try_recv().map(|s| s.0).ok(), Some(7));
    assert_eq!(rx.try_recv().map(|s| s.0).ok(), Some(8));
    assert!(rx.try_recv().is_err() && rx.is_closed(), "the writer's channel closed with the end");
    shard.end(Sampled::Cancelled);
    assert!(!shard.is_open());
}

#[test]
fn a_handle_dropped_unended_tells_its_finisher_nothing() {
    let (tx, _rx) = mpsc::channel(1);
    let (shard, heard) = ShardHandle::new(3, Arc::new(AtomicBool::new(false)), tx);
    drop(shard);
    assert!(heard.blocking_recv().is_err());
}

/// A device loop on the tiny random UNet, fed `batches`; returns its batch reports.
fn run_loop(batches: Vec<ReadyBatch>) -> Result<Vec<BatchReport>, String> {
    let unet = LoadedUNet::random(crate::init_model::Preset::Tiny.unet_config(), 3).unwrap();
    let (tx, rx) = mpsc::channel(batches.len().max(1));
    for b in batches {
        tx.try_send(b).map_err(|_| "queueing a batch".to_string())?;
    }
    drop(tx);
    let abort = AtomicBool::new(false);
    let place = Placement { device: tch::Device::Cpu, kind: tch::Kind::Float };
    let unets = BTreeMap::from([("tiny", &unet)]);
    let lane = Lane { name: "test", unets, place, abort: &abort, on_step: &|| {}, demand: None };
    let mut reports = Vec::new();
    run(&lane, rx, |r| reports.push(r))?;
    Ok(reports)
}

fn batch(rows: Vec<Row>, number: usize) -> ReadyBatch {
    let scheduler = crate::schedulers::SchedulerConfig::from_json(
        crate::schedulers::SchedulerKind::Ddim,
        r#"{"_class_name":"DDIMScheduler"}"#,
    )
    .unwrap();
    ReadyBatch {
        model: "tiny".into(),
        scheduler: Arc::new(scheduler),
        batch_size: 2,
        steps: 2,
        eta: 0.0,
        guidance: None,
        rows,
        noise: None,
        number,
        fed: true,
        span: tracing::Span::none(),
    }
}

/// Two shards sharing a batch (co-batching): each gets its own rows, ends once, and a shard stopped
/// before its batch gets nothing while the batch still runs for the other; a batch whose every shard
/// stopped is not sampled at all.
#[test]
fn co_batched_rows_reach_their_own_shards_and_stopped_shards_get_none() {
    let (a_tx, mut a_rx) = mpsc::channel(8);
    let (b_tx, mut b_rx) = mpsc::channel(8);
    let (c_tx, mut c_rx) = mpsc::channel(8);
    let c_stop = Arc::new(AtomicBool::new(false));
    let (a, mut a_heard) = ShardHandle::new(3, Arc::new(AtomicBool::new(false)), a_tx);
    let (b, mut b_heard) = ShardHandle::new(1, Arc::new(AtomicBool::new(false)), b_tx);
    let (c, mut c_heard) = ShardHandle::new(1, Arc::clone(&c_stop), c_tx);
    let row = |shard: &Arc<ShardHandle>, index: u64| Row {
        shard: Arc::clone(shard),
        index,
        seed: 100 + index,
        class: None,
    };
    c_stop.store(true, Ordering::Relaxed);
    let batches = vec![
        batch(vec![row(&a, 0), row(&a, 1)], 0),
        batch(vec![row(&a, 2), row(&b, 7)], 1),
        batch(vec![row(&c, 0)], 2),
    ];
    drop((a, b, c));
    let reports = run_loop(batches).unwrap();
    assert_eq!(reports.iter().map(|r| r.number).collect::<Vec<_>>(), [0, 1], "the stopped shard's batch ran");
    let indices = |rx: &mut mpsc::Receiver<Sample>| {
        std::iter::from_fn(|| rx.try_recv().ok()).map(|s| s.0).collect::<Vec<_>>()
    };
    assert_eq!(indices(&mut a_rx), [0, 1, 2]);
    assert_eq!(indices(&mut b_rx), [7]);
    assert!(indices(&mut c_rx).is_empty());
    assert!(matches!(a_heard.try_recv(), Ok(Sampled::Done { seconds }) if seconds > 0.0));
    assert!(matches!(b_heard.try_recv(), Ok(Sampled::Done { .. })));
    assert_eq!(c_heard.try_recv().ok(), Some(Sampled::Cancelled));
}

/// A batch of a model not loaded on the device fails its shards, not the device: the loop goes on.
#[test]
fn a_batch_of_an_unknown_model_fails_its_shards_and_not_the_device() {
    let (tx, _rx) = mpsc::channel(4);
    let (shard, mut heard) = ShardHandle::new(1, Arc::new(AtomicBool::new(false)), tx);
    let mut other = batch(vec![Row { shard: Arc::clone(&shard), index: 0, seed: 1, class: None }], 0);
    other.model = "absent".into();
    drop(shard);
    assert!(run_loop(vec![other]).unwrap().is_empty());
    assert!(matches!(heard.try_recv(), Ok(Sampled::Failed { device_lost: false, .. })));
}

#[test]
fn a_stopped_shard_takes_no_more_images() {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, _rx) = mpsc::channel(1);
    let (shard, _heard) = ShardHandle::new(3, Arc::clone(&stop), tx);
    assert!(shard.is_open());
    stop.store(true, Ordering::Relaxed);
    assert!(!shard.is_open());
}
