//! SVG plots (plotters, SVG backend, no system fonts): latency CDF per system, transport
//! and durability; throughput against clients; latency against offered load.

use crate::report::Report;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

type Series = (String, Vec<(f64, f64)>);

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Draws `series` on log-log (or log-x) axes into `path`.
fn draw(path: &Path, title: &str, xdesc: &str, ydesc: &str, series: &[Series], log_y: bool) -> Result<()> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.0 > 0.0).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    x0 *= 0.8;
    x1 *= 1.25;
    if log_y {
        y0 = (y0 * 0.8).max(1e-3);
        y1 *= 1.25;
    } else {
        y0 = 0.0;
        y1 = y1.max(1.0);
    }
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(45).y_label_area_size(80);
    macro_rules! legend {
        ($chart:expr) => {
            $chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)
        };
    }
    if log_y {
        let mut chart = b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()).map_err(err)?;
        chart.configure_mesh().x_desc(xdesc).y_desc(ydesc).draw().map_err(err)?;
        for (i, (name, s)) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)).point_size(3))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        legend!(chart)?;
    } else {
        let mut chart = b.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(err)?;
        chart.configure_mesh().x_desc(xdesc).y_desc(ydesc).draw().map_err(err)?;
        for (i, (name, s)) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        legend!(chart)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes the plots for `report` into `dir`; returns the files written.
pub fn write_plots(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let runs = &report.runs;

    // 1. Latency CDF: one client, 64 B, batch 1, closed loop, per system/transport/durability,
    // beside the baselines.
    let mut cdf: Vec<Series> = runs
        .iter()
        .filter(|r| r.mode == "closed" && r.clients == 1 && r.batch == 1 && r.size == 64)
        .map(|r| {
            let spin = if r.spin_us > 0 { format!(", spin {} us", r.spin_us) } else { String::new() };
            (format!("{} {} {}{spin} (commit)", r.system, r.transport, r.durability), r.cdf.clone())
        })
        .collect();
    cdf.push(("baseline: TCP loopback RTT 64 B".into(), report.baselines.tcp_rtt_cdf.clone()));
    if !report.baselines.dpdk_rtt_cdf.is_empty() {
        cdf.push(("baseline: DPDK af_packet RTT 64 B (netns)".into(), report.baselines.dpdk_rtt_cdf.clone()));
    }
    if !report.baselines.dpdk_rtt_busy_cdf.is_empty() {
        cdf.push(("baseline: DPDK RTT 64 B, busy-polling".into(), report.baselines.dpdk_rtt_busy_cdf.clone()));
    }
    if !report.baselines.rdma_rtt_cdf.is_empty() {
        cdf.push(("baseline: RDMA one-sided WRITE RTT 64 B".into(), report.baselines.rdma_rtt_cdf.clone()));
    }
    if !report.baselines.rdma_rtt_busy_cdf.is_empty() {
        cdf.push(("baseline: RDMA RTT 64 B, busy-polling".into(), report.baselines.rdma_rtt_busy_cdf.clone()));
    }
    cdf.push(("baseline: 4 KiB pwrite+fdatasync".into(), report.baselines.fdatasync_cdf.clone()));
    let p = dir.join("latency_cdf.svg");
    draw(&p, "Latency CDF: 1 client, 64 B entries, closed loop", "latency (us, log)", "quantile", &cdf, false)?;
    written.push(p);

    // 2. Throughput against clients: closed loop, 64 B, per system/transport/durability/batch.
    let mut keys: Vec<(String, String, String, usize)> = runs
        .iter()
        .filter(|r| r.mode == "closed" && r.size == 64 && r.spin_us == 0)
        .map(|r| (r.system.clone(), r.transport.clone(), r.durability.clone(), r.batch))
        .collect();
    keys.sort();
    keys.dedup();
    let tput: Vec<Series> = keys
        .iter()
        .map(|(s, t, d, b)| {
            let mut pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| {
                    r.mode == "closed"
                        && r.size == 64
                        && r.spin_us == 0
                        && &r.system == s
                        && &r.transport == t
                        && &r.durability == d
                        && r.batch == *b
                })
                .map(|r| (r.clients as f64, r.throughput))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (format!("{s} {t} {d} batch {b}"), pts)
        })
        .filter(|s| s.1.len() > 1)
        .collect();
    let p = dir.join("throughput_vs_clients.svg");
    draw(&p, "Throughput against clients: 64 B entries, closed loop", "clients (log)", "appends/s (log)", &tput, true)?;
    written.push(p);

    // 3. Latency against offered load: open loop, p50 and p99.
    let mut keys: Vec<(String, String, String, usize, usize, usize)> = runs
        .iter()
        .filter(|r| r.mode == "open")
        .map(|r| (r.system.clone(), r.transport.clone(), r.durability.clone(), r.clients, r.size, r.batch))
        .collect();
    keys.sort();
    keys.dedup();
    let mut lat: Vec<Series> = Vec::new();
    for (s, t, d, c, z, b) in &keys {
        let mut sel: Vec<_> = runs
            .iter()
            .filter(|r| {
                r.mode == "open"
                    && &r.system == s
                    && &r.transport == t
                    && &r.durability == d
                    && r.clients == *c
                    && r.size == *z
                    && r.batch == *b
            })
            .collect();
        sel.sort_by(|a, b| a.offered_rate.unwrap_or(0.0).total_cmp(&b.offered_rate.unwrap_or(0.0)));
        let name = format!("{s} {t} {d} c={c} {z}B b={b}");
        lat.push((
            format!("{name} p50"),
            sel.iter().map(|r| (r.offered_rate.unwrap_or(0.0), r.latency.p50_us)).collect(),
        ));
        lat.push((
            format!("{name} p99"),
            sel.iter().map(|r| (r.offered_rate.unwrap_or(0.0), r.latency.p99_us)).collect(),
        ));
    }
    if !lat.is_empty() {
        let p = dir.join("latency_vs_load.svg");
        draw(
            &p,
            "Latency against offered load (open loop, from intended send time)",
            "offered appends/s (log)",
            "latency (us, log)",
            &lat,
            true,
        )?;
        written.push(p);
    }
    Ok(written)
}
