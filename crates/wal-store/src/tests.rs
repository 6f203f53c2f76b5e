use super::*;

const MIB: u64 = 1 << 20;

fn store() -> (tempfile::TempDir, WalStore, SegmentSize) {
    let dir = tempfile::tempdir().unwrap();
    let s = WalStore::open(&dir.path().join("wal"), MasterKey::generate(), 3).unwrap();
    (dir, s, SegmentSize::new(MIB).unwrap())
}

fn wal_bytes(start: u64, n: usize) -> Vec<u8> {
    (0..n as u64)
        .map(|i| ((start + i) % 253) as u8 ^ (((start + i) / 8192) % 7) as u8)
        .collect()
}

fn plaintext(d: &WalFileData) -> Vec<u8> {
    d.frames
        .iter()
        .flat_map(|f| f.plaintext("t").unwrap())
        .collect()
}

#[test]
fn writer_streams_across_segments_and_reads_back_identical() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(42, size).unwrap();
    let tli = TimeLineId(1);
    let start = Lsn(3 * MIB);
    let mut w = c.writer(tli, start).unwrap();
    let total = 2 * MIB as usize + 1000;
    let data = wal_bytes(start.0, total);
    for (i, chunk) in data.chunks(70_000).enumerate() {
        w.write(start.plus((i * 70_000) as u64), chunk).unwrap();
    }
    assert_eq!(w.sync().unwrap(), start.plus(total as u64));
    s.flush_seals().unwrap();
    assert_eq!(
        c.status().unwrap().latest,
        Some((tli, start.plus(total as u64)))
    );
    let seg3 = c.read("000000010000000000000003", false).unwrap().unwrap();
    assert_eq!(plaintext(&seg3), &data[..MIB as usize]);
    assert_eq!(seg3.blake3, *blake3::hash(&data[..MIB as usize]).as_bytes());
    let seg4 = c.read("000000010000000000000004", false).unwrap().unwrap();
    assert_eq!(plaintext(&seg4), &data[MIB as usize..2 * MIB as usize]);
    // the in-progress segment is only served when partial data is acceptable
    assert!(c.read("000000010000000000000005", false).unwrap().is_none());
    let p = c.read("000000010000000000000005", true).unwrap().unwrap();
    assert!(p.partial);
    assert_eq!(plaintext(&p), &data[2 * MIB as usize..]);
    assert!(c.read("000000010000000000000006", true).unwrap().is_none());
    // no plaintext at rest: the sealed segment does not contain the WAL bytes
    let raw = std::fs::read(c.dir().join("00000001").join("000000010000000000000003")).unwrap();
    assert!(!raw.windows(64).any(|w| w == &data[1000..1064]));
}

#[test]
fn writer_resumes_after_drop_and_skips_resent_bytes() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    let tli = TimeLineId(1);
    let data = wal_bytes(0, 300_000);
    let mut w = c.writer(tli, Lsn(0)).unwrap();
    w.write(Lsn(0), &data[..100_000]).unwrap();
    w.sync().unwrap();
    drop(w);
    assert_eq!(c.status().unwrap().latest, Some((tli, Lsn(100_000))));
    let mut w = c.writer(tli, Lsn(100_000)).unwrap();
    // a resend overlapping what is stored is accepted and deduplicated
    w.write(Lsn(50_000), &data[50_000..200_000]).unwrap();
    w.write(Lsn(200_000), &data[200_000..]).unwrap();
    w.sync().unwrap();
    let err = w.write(Lsn(400_000), b"x").unwrap_err();
    assert!(matches!(err, Error::Gap { .. }), "{err}");
    let p = c.read("000000010000000000000000", true).unwrap().unwrap();
    assert_eq!(plaintext(&p), data);
}

#[test]
fn torn_tail_of_open_segment_is_dropped_on_reopen() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    let tli = TimeLineId(1);
    let mut w = c.writer(tli, Lsn(0)).unwrap();
    w.write(Lsn(0), &wal_bytes(0, 5000)).unwrap();
    w.sync().unwrap();
    drop(w);
    let open = c
        .dir()
        .join("00000001")
        .join("000000010000000000000000.open");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&open)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0, 0, 1, 0, 0, 9, 9]).unwrap();
    drop(f);
    let mut w = c.writer(tli, Lsn(5000)).unwrap();
    assert_eq!(w.end(), Lsn(5000));
    w.write(Lsn(5000), &wal_bytes(5000, 100)).unwrap();
    w.sync().unwrap();
    let p = c.read("000000010000000000000000", true).unwrap().unwrap();
    assert_eq!(plaintext(&p), wal_bytes(0, 5100));
}

#[test]
fn first_write_must_start_at_segment_boundary_and_gaps_are_refused() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    assert!(matches!(
        c.writer(TimeLineId(1), Lsn(100)),
        Err(Error::NotSegmentStart { .. })
    ));
    let mut w = c.writer(TimeLineId(1), Lsn(MIB)).unwrap();
    w.write(Lsn(MIB), b"abc").unwrap();
    w.sync().unwrap();
    drop(w);
    assert!(matches!(
        c.writer(TimeLineId(1), Lsn(MIB + 10)),
        Err(Error::Gap { .. })
    ));
}

#[test]
fn end_timeline_archives_partial_and_refuses_more() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    let mut w = c.writer(TimeLineId(1), Lsn(0)).unwrap();
    let data = wal_bytes(0, 12345);
    w.write(Lsn(0), &data).unwrap();
    w.end_timeline(Lsn(12345)).unwrap();
    let p = c
        .read("000000010000000000000000.partial", false)
        .unwrap()
        .unwrap();
    assert_eq!(plaintext(&p), data);
    assert!(c.read("000000010000000000000000", false).unwrap().is_none());
    assert!(
        c.read("000000010000000000000000", true)
            .unwrap()
            .unwrap()
            .partial
    );
    assert!(matches!(
        c.writer(TimeLineId(1), Lsn(12345)),
        Err(Error::TimelineEnded { .. })
    ));
    // the next timeline starts fresh at the segment start
    let mut w2 = c.writer(TimeLineId(2), Lsn(0)).unwrap();
    w2.write(Lsn(0), &data).unwrap();
    w2.sync().unwrap();
    assert_eq!(
        c.status().unwrap().latest,
        Some((TimeLineId(2), Lsn(12345)))
    );
}

#[test]
fn register_refuses_another_database_system() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(7, size).unwrap();
    c.register(7, size).unwrap();
    let err = c.register(8, size).unwrap_err();
    assert!(err.to_string().contains("database system 7"), "{err}");
    assert!(matches!(
        s.cluster("nope").unwrap().status(),
        Err(Error::UnknownCluster(_))
    ));
    assert_eq!(s.clusters().unwrap(), vec!["c1".to_string()]);
}

#[test]
fn put_file_is_idempotent_and_detects_conflicts() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    assert!(
        c.put_file(
            "00000002.history",
            b"1\t0/5000000\tno recovery target specified\n"
        )
        .unwrap()
    );
    assert!(
        !c.put_file(
            "00000002.history",
            b"1\t0/5000000\tno recovery target specified\n"
        )
        .unwrap()
    );
    assert!(matches!(
        c.put_file("00000002.history", b"other"),
        Err(Error::Conflict { .. })
    ));
    let h = c.read("00000002.history", false).unwrap().unwrap();
    assert_eq!(
        plaintext(&h),
        b"1\t0/5000000\tno recovery target specified\n"
    );
}

#[test]
fn corrupted_segment_is_reported_not_served() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    let mut w = c.writer(TimeLineId(1), Lsn(0)).unwrap();
    w.write(Lsn(0), &wal_bytes(0, MIB as usize)).unwrap();
    w.sync().unwrap();
    s.flush_seals().unwrap();
    let path = c.dir().join("00000001").join("000000010000000000000000");
    let mut raw = std::fs::read(&path).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x01;
    std::fs::write(&path, raw).unwrap();
    let err = c.read("000000010000000000000000", false).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("000000010000000000000000") && msg.contains("corrupt"),
        "{msg}"
    );
}

#[test]
fn recover_seals_a_complete_in_progress_segment_left_by_a_crash() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    let tli = TimeLineId(1);
    let segno = SegmentNo(0);
    // The state a crash leaves between "complete and synced" and "sealed": a full .open file.
    let data = wal_bytes(0, MIB as usize);
    let header = ObjectHeader::new(
        ObjectKind::WalOpen,
        &c.object_name(&layout::open_file_name(tli, segno, size)),
    );
    let cipher = FrameCipher::new(c.master(), &header);
    let mut file = header.encode();
    for (i, chunk) in data.chunks(100_000).enumerate() {
        cipher.seal_frame((i * 100_000) as u64, chunk, Some(1), &mut file);
    }
    std::fs::create_dir_all(c.dir().join("00000001")).unwrap();
    let open = layout::open_path(c.dir(), tli, segno, size);
    std::fs::write(&open, &file).unwrap();
    // Readable before recovery, from the in-progress file...
    let d = c.read("000000010000000000000000", false).unwrap().unwrap();
    assert_eq!(plaintext(&d), data);
    // ...and sealed by recovery.
    c.recover().unwrap();
    assert!(!open.exists());
    assert!(layout::segment_path(c.dir(), tli, segno, size).exists());
    let d = c.read("000000010000000000000000", false).unwrap().unwrap();
    assert_eq!(plaintext(&d), data);
    assert_eq!(c.status().unwrap().latest, Some((tli, Lsn(MIB))));
}

#[test]
fn remove_before_keeps_history_newer_segments_and_what_is_not_allowed() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(1, size).unwrap();
    // Timeline 1: segments 0..=2 complete, 3 partial (promotion); timeline 2 from 3 on.
    let mut w = c.writer(TimeLineId(1), Lsn(0)).unwrap();
    let data = wal_bytes(0, 3 * MIB as usize + 5000);
    w.write(Lsn(0), &data).unwrap();
    w.end_timeline(Lsn(data.len() as u64)).unwrap();
    c.put_file(
        "00000002.history",
        b"1\t0/3001388\tno recovery target specified\n",
    )
    .unwrap();
    c.put_file(
        "000000010000000000000001.00000028.backup",
        b"START WAL LOCATION: 0/1000028\n",
    )
    .unwrap();
    let mut w2 = c.writer(TimeLineId(2), Lsn(3 * MIB)).unwrap();
    let more = wal_bytes(3 * MIB, 2 * MIB as usize + 10);
    w2.write(Lsn(3 * MIB), &more).unwrap();
    w2.sync().unwrap();
    s.flush_seals().unwrap();
    let before = c.list_files().unwrap();
    assert!(
        before.contains(&"000000010000000000000000".to_string()),
        "{before:?}"
    );

    // The oldest retained backup starts in segment 2 of timeline 1; segment 0 may not go
    // yet (say, Tier 2 lacks it).
    let removed = c
        .remove_before(SegmentNo(2), |n| n != "000000010000000000000000")
        .unwrap();
    assert_eq!(
        removed,
        [
            "000000010000000000000001",
            "000000010000000000000001.00000028.backup"
        ]
    );
    let after = c.list_files().unwrap();
    for kept in [
        "000000010000000000000000",
        "000000010000000000000002",
        "000000010000000000000003.partial",
        "000000020000000000000003",
        "000000020000000000000004",
        "00000002.history",
    ] {
        assert!(
            after.contains(&kept.to_string()),
            "{kept} missing: {after:?}"
        );
    }
    assert!(c.read("000000010000000000000001", false).unwrap().is_none());
    // A later retention past the promotion removes the old timeline's partial too.
    let removed = c.remove_before(SegmentNo(4), |_| true).unwrap();
    assert!(
        removed.contains(&"000000010000000000000003.partial".to_string()),
        "{removed:?}"
    );
    assert!(
        removed.contains(&"000000020000000000000003".to_string()),
        "{removed:?}"
    );
    assert!(
        c.list_files()
            .unwrap()
            .contains(&"00000002.history".to_string())
    );
    // The writer continues undisturbed.
    w2.write(Lsn(5 * MIB + 10), &wal_bytes(5 * MIB + 10, 100))
        .unwrap();
    w2.sync().unwrap();
}

#[test]
fn reseal_under_another_key_keeps_the_content_and_binds_the_name() {
    let (_d, s, size) = store();
    let c = s.cluster("c1").unwrap();
    c.register(42, size).unwrap();
    let start = Lsn(3 * MIB);
    let data = wal_bytes(start.0, MIB as usize);
    let mut w = c.writer(TimeLineId(1), start).unwrap();
    w.write(start, &data).unwrap();
    w.sync().unwrap();
    s.flush_seals().unwrap();
    let name = "000000010000000000000003";
    let original = c.read(name, false).unwrap().unwrap();
    let other = MasterKey::generate();
    let shown = sealed_name("c1", name);
    let kind = object_kind(&WalFileName::parse(name, size).unwrap());
    let copy = reseal(&other, kind, &shown, &original);
    let back = open_sealed(&other, &shown, &copy).unwrap();
    assert_eq!(plaintext(&back), data);
    assert_eq!(back.blake3, original.blake3);
    assert_eq!(back.total_len, MIB);
    // The Tier 1 key does not open it, nor does another name, nor a flipped byte.
    assert!(open_sealed(&s.inner.master, &shown, &copy).is_err());
    assert!(open_sealed(&other, &sealed_name("c2", name), &copy).is_err());
    let mut bad = copy.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    assert!(open_sealed(&other, &shown, &bad).is_err());
}

/// Writes `n` bytes for `c` from LSN 0 in `chunks` writes of one frame each, syncs, and
/// returns the path of its in-progress file.
fn write_open(c: &ClusterWal, n: usize, chunks: usize) -> std::path::PathBuf {
    let mut w = c.writer(TimeLineId(1), Lsn(0)).unwrap();
    let data = wal_bytes(0, n);
    let step = n.div_ceil(chunks);
    for (i, chunk) in data.chunks(step).enumerate() {
        w.write(Lsn((i * step) as u64), chunk).unwrap();
    }
    w.sync().unwrap();
    c.dir()
        .join("00000001")
        .join("000000010000000000000000.open")
}

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn seal_failure_of_one_cluster_is_reported_to_that_cluster_only() {
    let (_d, s, size) = store();
    let a = s.cluster("a").unwrap();
    let b = s.cluster("b").unwrap();
    a.register(1, size).unwrap();
    b.register(2, size).unwrap();
    let mut wa = a.writer(TimeLineId(1), Lsn(0)).unwrap();
    let mut wb = b.writer(TimeLineId(1), Lsn(0)).unwrap();
    // A directory where a's sealed segment must go: its seal cannot rename onto it.
    let obstacle = a.dir().join("00000001").join("000000010000000000000000");
    std::fs::create_dir_all(&obstacle).unwrap();
    wa.write(Lsn(0), &wal_bytes(0, MIB as usize)).unwrap();
    wa.sync().unwrap();
    a.sealer().drain();

    // b streams on, across a segment and its seal, and never sees a's failure.
    for i in 0..3u64 {
        let at = i * MIB / 2;
        wb.write(Lsn(at), &wal_bytes(at, (MIB / 2) as usize))
            .unwrap();
        wb.sync().unwrap();
    }
    b.sealer().flush().unwrap();
    assert!(b.read("000000010000000000000000", false).unwrap().is_some());
    drop(wb);
    let mut wb = b.writer(TimeLineId(1), Lsn(3 * MIB / 2)).unwrap();
    wb.write(Lsn(3 * MIB / 2), &wal_bytes(3 * MIB / 2, 100))
        .unwrap();
    assert_eq!(wb.sync().unwrap(), Lsn(3 * MIB / 2 + 100));

    // a's writer gets a's failure, naming the file it could not write.
    let e = wa.write(Lsn(MIB), &wal_bytes(MIB, 10)).unwrap_err();
    assert!(matches!(e, Error::SealFailed(_)), "{e}");
    assert!(
        matches!(e.root(), Error::Io { path, .. } if *path == obstacle),
        "{e}"
    );
    // Reported once, and to nobody else.
    s.flush_seals().unwrap();
    // a's WAL is all still there, in its in-progress file.
    std::fs::remove_dir(&obstacle).unwrap();
    let d = a.read("000000010000000000000000", false).unwrap().unwrap();
    assert_eq!(plaintext(&d), wal_bytes(0, MIB as usize));
}

#[test]
fn damaged_open_segment_breaks_only_its_cluster_until_moved_aside() {
    let (_d, s, size) = store();
    let a = s.cluster("a").unwrap();
    let b = s.cluster("b").unwrap();
    a.register(1, size).unwrap();
    b.register(2, size).unwrap();
    let open = write_open(&a, 30_000, 3);
    write_open(&b, 30_000, 3);
    // A byte in the ciphertext of the first of three frames (the header is about 100
    // bytes, each frame 10 kB).
    flip_byte(&open, 2000);

    let failed = s.recover_all().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "a");
    assert!(
        matches!(&failed[0].1, Error::Damaged { path, .. } if *path == open),
        "{}",
        failed[0].1
    );
    assert_eq!(s.broken_clusters(), vec![("a".to_string(), open.clone())]);
    let e = a.check_usable().unwrap_err();
    assert!(matches!(e, Error::Damaged { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&open.display().to_string()) && msg.contains("HINT"),
        "{msg}"
    );
    // The damaged file is neither sealed nor truncated, and a writer is refused.
    assert!(matches!(
        a.writer(TimeLineId(1), Lsn(30_000)),
        Err(Error::Damaged { .. })
    ));
    assert!(open.exists());

    // b is untouched.
    b.check_usable().unwrap();
    let mut wb = b.writer(TimeLineId(1), Lsn(30_000)).unwrap();
    wb.write(Lsn(30_000), &wal_bytes(30_000, 10)).unwrap();
    assert_eq!(wb.sync().unwrap(), Lsn(30_010));

    // The operator moves the file aside: a is usable again, its archive starts over.
    std::fs::rename(&open, open.with_extension("open.damaged")).unwrap();
    a.check_usable().unwrap();
    assert!(s.broken_clusters().is_empty());
    assert_eq!(a.status().unwrap().latest, None);
    a.writer(TimeLineId(1), Lsn(0)).unwrap();
}

#[test]
fn complete_last_frame_that_does_not_authenticate_is_refused_not_dropped() {
    let (_d, s, size) = store();
    let a = s.cluster("a").unwrap();
    a.register(1, size).unwrap();
    let open = write_open(&a, 20_000, 2);
    let len = std::fs::metadata(&open).unwrap().len() as usize;
    flip_byte(&open, len - 100);
    let Err(e) = a.writer(TimeLineId(1), Lsn(20_000)) else {
        panic!("a writer opened over a damaged last frame");
    };
    assert!(matches!(e, Error::Damaged { .. }), "{e}");
    assert_eq!(std::fs::metadata(&open).unwrap().len() as usize, len);
    assert_eq!(s.broken_clusters().len(), 1);
}
