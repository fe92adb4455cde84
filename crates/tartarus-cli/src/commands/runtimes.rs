//! `tartarus runtimes`: which isolation lanes this host can run, why not for the others, and each engine's
//! version.

use clap::Args;
use tartarus_runtime::lanes::{self, LaneReport};

use super::run::lane_config;

#[derive(Args, Debug)]
pub struct RuntimesArgs {
    /// Print the reports as JSON (one array)
    #[arg(long)]
    json: bool,
}

pub fn run(args: RuntimesArgs) -> anyhow::Result<u8> {
    let reports = lanes::probe(&lane_config()?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", table(&reports));
    }
    Ok(0)
}

/// `LANE  AVAILABLE  VERSION  DETAIL`, one row per lane; an unavailable lane's detail is its reason.
fn table(reports: &[LaneReport]) -> String {
    let rows: Vec<[String; 4]> = reports
        .iter()
        .map(|r| {
            [
                r.name.to_string(),
                if r.available { "yes" } else { "no" }.to_string(),
                r.version.clone().unwrap_or_else(|| "-".into()),
                r.reason.clone().or_else(|| r.detail.clone()).unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["LANE", "AVAILABLE", "VERSION", "DETAIL"].map(String::from);
    let widths: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in [&header].into_iter().chain(rows.iter()) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tartarus_runtime::lanes::LaneName;

    #[test]
    fn test_an_unavailable_lane_shows_its_reason_in_the_table() {
        let reports = [
            LaneReport {
                name: LaneName::Process,
                available: true,
                reason: None,
                version: Some("6.1.0".into()),
                detail: Some("cgroups v2".into()),
                emulated: None,
            },
            LaneReport {
                name: LaneName::Gvisor,
                available: false,
                reason: Some("runsc not found: install it".into()),
                version: None,
                detail: None,
                emulated: None,
            },
        ];
        let text = table(&reports);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "LANE     AVAILABLE  VERSION  DETAIL");
        assert_eq!(lines[1], "process  yes        6.1.0    cgroups v2");
        assert_eq!(
            lines[2],
            "gvisor   no         -        runsc not found: install it"
        );
    }
}
