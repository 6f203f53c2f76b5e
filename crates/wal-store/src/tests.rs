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
