//! CPU profiles in the pprof format (readable by `go tool pprof`), sampled with SIGPROF.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use prost::Message;

#[allow(clippy::all)] // generated code
mod pb {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}

/// Samples per second.
const FREQUENCY: i32 = 99;
/// The longest profile one request may ask for.
pub const MAX_SECONDS: u64 = 300;

/// Profiles the whole process for `duration` and returns the profile, encoded. One at a
/// time: a second request while one runs is refused (the timer is process-wide).
pub fn cpu_profile(duration: Duration) -> anyhow::Result<Vec<u8>> {
    static BUSY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUSY.try_lock().map_err(|_| {
        anyhow::anyhow!("a CPU profile is already being taken; try again when it ends")
    })?;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .context("start the CPU profiler")?;
    std::thread::sleep(duration);
    let report = guard.report().build().context("build the CPU profile")?;
    drop(guard);
    Ok(encode(&report, duration))
}

/// Interns strings into the profile's string table (index 0 is "").
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        Strings {
            table: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

fn encode(report: &pprof::Report, duration: Duration) -> Vec<u8> {
    let period = 1_000_000_000 / i64::from(FREQUENCY);
    let mut strings = Strings::new();
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let mut function_list = Vec::new();
    let mut locations: HashMap<Vec<(u64, i64)>, u64> = HashMap::new();
    let mut location_list = Vec::new();
    let mut samples = Vec::new();
    for (frames, &count) in &report.data {
        let mut ids = Vec::with_capacity(frames.frames.len());
        // Leaf first, as both pprof-rs and the format order them.
        for frame in &frames.frames {
            let lines: Vec<(u64, i64)> = frame
                .iter()
                .map(|symbol| {
                    let (name, file) = (symbol.name(), symbol.filename().into_owned());
                    let next = function_list.len() as u64 + 1;
                    let id = *functions
                        .entry((name.clone(), file.clone()))
                        .or_insert_with(|| {
                            function_list.push(pb::Function {
                                id: next,
                                name: strings.id(&name),
                                system_name: strings.id(&symbol.sys_name()),
                                filename: strings.id(&file),
                                start_line: 0,
                            });
                            next
                        });
                    (id, i64::from(symbol.lineno()))
                })
                .collect();
            let next = location_list.len() as u64 + 1;
            let id = *locations.entry(lines.clone()).or_insert_with(|| {
                location_list.push(pb::Location {
                    id: next,
                    mapping_id: 0,
                    address: 0,
                    line: lines
                        .iter()
                        .map(|&(function_id, line)| pb::Line { function_id, line })
                        .collect(),
                });
                next
            });
            ids.push(id);
        }
        let count = count.max(0) as i64;
        let thread = strings.id("thread");
        let name = strings.id(&frames.thread_name_or_id());
        samples.push(pb::Sample {
            location_id: ids,
            value: vec![count, count * period],
            label: vec![pb::Label {
                key: thread,
                str: name,
                num: 0,
                num_unit: 0,
            }],
        });
    }
    let value_type = |strings: &mut Strings, t: &str, u: &str| pb::ValueType {
        r#type: strings.id(t),
        unit: strings.id(u),
    };
    let sample_type = vec![
        value_type(&mut strings, "samples", "count"),
        value_type(&mut strings, "cpu", "nanoseconds"),
    ];
    let period_type = Some(value_type(&mut strings, "cpu", "nanoseconds"));
    let default_sample_type = strings.id("cpu");
    let start = report
        .timing
        .start_time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let profile = pb::Profile {
        sample_type,
        sample: samples,
        mapping: Vec::new(),
        location: location_list,
        function: function_list,
        string_table: strings.table,
        time_nanos: i64::try_from(start.as_nanos()).unwrap_or(i64::MAX),
        duration_nanos: i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX),
        period_type,
        period,
        default_sample_type,
    };
    profile.encode_to_vec()
}
