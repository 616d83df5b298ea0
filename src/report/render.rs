//! The three renderings of a [`Report`]: JSON (the report itself,
//! serialised), Markdown, and one self-contained HTML page (inline CSS
//! and SVG charts, no script, no external resource).

use std::fmt::Write;

use super::{Basis, Report};

pub fn json(r: &Report) -> String {
    // A report is plain data: serialisation cannot fail.
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn basis(b: Basis) -> &'static str {
    match b {
        Basis::Observed => "observed",
        Basis::Declared => "declared",
        Basis::ObservedAndDeclared => "observed + declared",
        Basis::NotJudged => "not judged",
    }
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn period(r: &Report) -> String {
    format!(
        "{} to {} (records from {} to {})",
        r.period.since.as_deref().unwrap_or("the beginning"),
        r.period.until.as_deref().unwrap_or("now"),
        r.period.first_record.as_deref().unwrap_or("-"),
        r.period.last_record.as_deref().unwrap_or("-"),
    )
}

pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Sovereignty report{}\n",
        r.vendor
            .as_ref()
            .map_or(String::new(), |v| format!(": {v}"))
    );
    let _ = writeln!(
        o,
        "**Score: {} / {}** — **{}** (≥ 90 sovereign, 70–89 partial, < 70 insufficient). \
         Criteria with evidence: {} points of 100; the rest are not judged and score 0.\n",
        r.score, r.max, r.verdict, r.judged_max
    );
    let _ = writeln!(
        o,
        "Period: {}. Generated {} by rempart {}.\n",
        period(r),
        r.generated_at,
        r.rempart_version
    );
    let _ = writeln!(
        o,
        "| Group | Criterion | Score | Basis |\n|---|---|---:|---|"
    );
    for c in &r.criteria {
        let _ = writeln!(
            o,
            "| {} | {} | {} / {} | {} |",
            c.group,
            c.title,
            c.score,
            c.max,
            basis(c.basis)
        );
    }
    let _ = writeln!(o, "\n## Criteria\n");
    for c in &r.criteria {
        let _ = writeln!(
            o,
            "### {} — {} / {} ({})\n",
            c.title,
            c.score,
            c.max,
            basis(c.basis)
        );
        for e in &c.evidence {
            let _ = writeln!(o, "- {e}");
        }
        if !c.examples.is_empty() {
            let _ = writeln!(
                o,
                "- example decisions: {}",
                c.examples
                    .iter()
                    .map(|x| format!("`{x}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for i in &c.improve {
            let _ = writeln!(o, "- **to improve:** {i}");
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "## Operational control (not part of the 100 points)\n\n| Control | Status | Detail | To improve |\n|---|---|---|---|");
    for c in &r.controls {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            c.title,
            c.status,
            md_cell(&c.detail),
            md_cell(c.improve.as_deref().unwrap_or(""))
        );
    }
    let obs = &r.observations;
    let _ = writeln!(
        o,
        "\n## Traffic\n\n{} decisions read from {} file(s){}.\n",
        obs.decisions,
        obs.files.len(),
        if obs.truncated {
            " (stopped at the record cap)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "| Direction | Outcome | Requests |\n|---|---|---:|");
    for (d, outcomes) in &obs.outcomes {
        for (k, n) in outcomes {
            let _ = writeln!(o, "| {d} | {k} | {n} |");
        }
    }
    let _ = writeln!(o, "\n### Destinations by country and operator\n\n| Direction | Country | Operator | Law | CLOUD Act | Verdict | Requests | Forwarded | Denied | Bytes | Hosts | Examples |\n|---|---|---|---|---|---|---:|---:|---:|---:|---|---|");
    for d in obs.destinations.iter().take(50) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.direction,
            d.country.as_deref().unwrap_or("?"),
            d.operator.as_deref().unwrap_or("?"),
            d.jurisdiction.as_deref().unwrap_or("?"),
            d.cloud_act.map_or("?", |c| if c { "yes" } else { "no" }),
            d.sovereign,
            d.requests,
            d.forwarded,
            d.denied,
            d.bytes,
            md_cell(&d.hosts.iter().cloned().collect::<Vec<_>>().join(", ")),
            d.forwarded_examples
                .iter()
                .chain(&d.examples)
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    let _ = writeln!(o, "\n### Denials and warnings by reason\n\n| Direction | Code | Denied | Monitored | Warned | Examples |\n|---|---|---:|---:|---:|---|");
    for x in &obs.reasons {
        let _ = writeln!(
            o,
            "| {} | `{}` | {} | {} | {} | {} |",
            x.direction,
            md_cell(&x.code),
            x.denied,
            x.monitored,
            x.warned,
            x.examples.join(" ")
        );
    }
    let _ = writeln!(o, "\n### Who touched what (ingress)\n\n| Subject | Requests | Denied | Writes | Exports | Resources |\n|---|---:|---:|---:|---:|---|");
    for s in obs.subjects.iter().take(50) {
        let res = s
            .resources
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            md_cell(&s.subject),
            s.requests,
            s.denied,
            s.writes,
            s.exports,
            md_cell(&res)
        );
    }
    o
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn band_colour(score: u32, max: u32) -> &'static str {
    if max == 0 {
        return "#888";
    }
    let r = score as f64 / max as f64;
    if r >= 0.9 {
        "#2e7d32"
    } else if r >= 0.7 {
        "#f9a825"
    } else {
        "#c62828"
    }
}

/// A horizontal bar chart: one row per (label, value, max, colour).
fn bars(rows: &[(String, f64, f64, &str, String)]) -> String {
    let row_h = 26;
    let h = rows.len() * row_h + 8;
    // Label column, bar, value text: wide enough for the longest
    // criterion title and "0 / 10 (not judged)".
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 900 {h}\" width=\"900\" height=\"{h}\" role=\"img\">"
    );
    for (i, (label, value, max, colour, text)) in rows.iter().enumerate() {
        let y = i * row_h + 4;
        let w = if *max > 0.0 {
            (value / max * 400.0).clamp(0.0, 400.0)
        } else {
            0.0
        };
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" class=\"l\">{}</text><rect x=\"330\" y=\"{y}\" width=\"400\" height=\"18\" fill=\"#eee\" stroke=\"#ccc\"/>\
             <rect x=\"330\" y=\"{y}\" width=\"{w:.1}\" height=\"18\" fill=\"{colour}\"/><text x=\"740\" y=\"{}\" class=\"v\">{}</text>",
            y + 14,
            esc(label),
            y + 14,
            esc(text)
        );
    }
    s.push_str("</svg>");
    s
}

pub fn html(r: &Report) -> String {
    let mut o = String::new();
    let title = format!(
        "Sovereignty report{}",
        r.vendor
            .as_ref()
            .map_or(String::new(), |v| format!(": {v}"))
    );
    let colour = band_colour(r.score, 100);
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>\
         body{{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1000px;padding:24px;color:#222;line-height:1.4}}\
         h1{{margin:0 0 8px}} h2{{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}}\
         .score{{display:flex;gap:24px;align-items:center;margin:16px 0}} .big{{font-size:56px;font-weight:700;color:{colour}}}\
         .verdict{{font-size:22px;font-weight:600;text-transform:uppercase;color:{colour}}} .muted{{color:#666;font-size:14px}}\
         table{{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0}} th,td{{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}}\
         th{{background:#f5f5f5}} td.n{{text-align:right}} .chart text{{font-size:13px;font-family:inherit}} .chart{{max-width:100%;height:auto}} .chart .v{{fill:#333}}\
         .crit{{border:1px solid #ddd;border-left:6px solid #888;padding:8px 12px;margin:10px 0;border-radius:4px}}\
         .crit h3{{margin:0 0 4px;font-size:16px}} .crit ul{{margin:4px 0;padding-left:20px;font-size:14px}} .tag{{font-size:12px;padding:1px 6px;border-radius:8px;background:#eee;margin-left:6px}}\
         .ok{{color:#2e7d32;font-weight:600}} .warning{{color:#b26a00;font-weight:600}} .missing{{color:#c62828;font-weight:600}} code{{font-size:12px}}\
         </style></head><body>",
        esc(&title)
    );
    let _ = write!(
        o,
        "<h1>{}</h1><div class=\"muted\">Period: {}. Generated {} by rempart {}. Grid: 100 points, 11 criteria (docs/report.md).</div>\
         <div class=\"score\"><div class=\"big\">{} <span class=\"muted\">/ {}</span></div><div><div class=\"verdict\">{}</div>\
         <div class=\"muted\">≥ 90 sovereign · 70–89 partial · &lt; 70 insufficient<br>criteria with evidence: {} of 100 points; the others are not judged and score 0</div></div></div>",
        esc(&title),
        esc(&period(r)),
        esc(&r.generated_at),
        r.rempart_version,
        r.score,
        r.max,
        r.verdict,
        r.judged_max
    );
    o.push_str("<h2>Score by criterion</h2>");
    let rows: Vec<_> = r
        .criteria
        .iter()
        .map(|c| {
            (
                c.title.to_string(),
                c.score as f64,
                c.max as f64,
                if c.basis == Basis::NotJudged {
                    "#9e9e9e"
                } else {
                    band_colour(c.score, c.max)
                },
                format!(
                    "{} / {}{}",
                    c.score,
                    c.max,
                    if c.basis == Basis::NotJudged {
                        " (not judged)"
                    } else {
                        ""
                    }
                ),
            )
        })
        .collect();
    o.push_str(&bars(&rows));

    let fw = &r.observations.forwarded;
    let total =
        (fw.eu.requests + fw.non_eu.requests + fw.unknown.requests + fw.local.requests) as f64;
    o.push_str("<h2>Where forwarded data went</h2>");
    let flow_rows = vec![
        (
            "EU".to_string(),
            fw.eu.requests as f64,
            total,
            "#2e7d32",
            format!("{} req", fw.eu.requests),
        ),
        (
            "outside the EU".to_string(),
            fw.non_eu.requests as f64,
            total,
            "#c62828",
            format!("{} req", fw.non_eu.requests),
        ),
        (
            "unknown location".to_string(),
            fw.unknown.requests as f64,
            total,
            "#f9a825",
            format!("{} req", fw.unknown.requests),
        ),
        (
            "private / loopback".to_string(),
            fw.local.requests as f64,
            total,
            "#9e9e9e",
            format!("{} req", fw.local.requests),
        ),
        (
            "to a CLOUD Act operator".to_string(),
            fw.cloud_act.requests as f64,
            total,
            "#6a1b9a",
            format!("{} req", fw.cloud_act.requests),
        ),
        (
            "monitored (deny not applied)".to_string(),
            fw.monitored as f64,
            total,
            "#ef6c00",
            format!("{} req", fw.monitored),
        ),
    ];
    o.push_str(&bars(&flow_rows));

    o.push_str("<h2>Criteria</h2>");
    for c in &r.criteria {
        let border = if c.basis == Basis::NotJudged {
            "#9e9e9e"
        } else {
            band_colour(c.score, c.max)
        };
        let _ = write!(
            o,
            "<div class=\"crit\" style=\"border-left-color:{border}\"><h3>{} — {} / {}<span class=\"tag\">{}</span><span class=\"tag\">{}</span></h3><ul>",
            esc(c.title),
            c.score,
            c.max,
            esc(c.group),
            basis(c.basis)
        );
        for e in &c.evidence {
            let _ = write!(o, "<li>{}</li>", esc(e));
        }
        if !c.examples.is_empty() {
            let _ = write!(
                o,
                "<li>example decisions (<code>rempart audit query</code>): {}</li>",
                c.examples
                    .iter()
                    .map(|x| format!("<code>{}</code>", esc(x)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for i in &c.improve {
            let _ = write!(o, "<li><b>To improve:</b> {}</li>", esc(i));
        }
        o.push_str("</ul></div>");
    }

    o.push_str("<h2>Operational control <span class=\"muted\">(not part of the 100 points)</span></h2><table><tr><th>Control</th><th>Status</th><th>Detail</th><th>To improve</th></tr>");
    for c in &r.controls {
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(c.title),
            c.status,
            c.status,
            esc(&c.detail),
            esc(c.improve.as_deref().unwrap_or(""))
        );
    }
    o.push_str("</table>");

    let obs = &r.observations;
    let _ = write!(o, "<h2>Destinations by country and operator</h2><div class=\"muted\">{} decisions from {} file(s){}</div>", obs.decisions, obs.files.len(), if obs.truncated { " (stopped at the record cap)" } else { "" });
    o.push_str("<table><tr><th>Direction</th><th>Country</th><th>Operator</th><th>Law</th><th>CLOUD Act</th><th>Verdict</th><th>Requests</th><th>Forwarded</th><th>Denied</th><th>Bytes</th><th>Hosts</th></tr>");
    for d in obs.destinations.iter().take(50) {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&d.direction),
            esc(d.country.as_deref().unwrap_or("?")),
            esc(d.operator.as_deref().unwrap_or("?")),
            esc(d.jurisdiction.as_deref().unwrap_or("?")),
            d.cloud_act.map_or("?", |c| if c { "yes" } else { "no" }),
            esc(&d.sovereign),
            d.requests,
            d.forwarded,
            d.denied,
            d.bytes,
            esc(&d.hosts.iter().cloned().collect::<Vec<_>>().join(", "))
        );
    }
    o.push_str("</table><h2>Denials and warnings by reason</h2><table><tr><th>Direction</th><th>Code</th><th>Denied</th><th>Monitored</th><th>Warned</th><th>Examples</th></tr>");
    for x in &obs.reasons {
        let _ = write!(
            o,
            "<tr><td>{}</td><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&x.direction),
            esc(&x.code),
            x.denied,
            x.monitored,
            x.warned,
            x.examples.iter().map(|e| format!("<code>{}</code>", esc(e))).collect::<Vec<_>>().join(" ")
        );
    }
    o.push_str("</table><h2>Who touched what (ingress)</h2><table><tr><th>Subject</th><th>Requests</th><th>Denied</th><th>Writes</th><th>Exports</th><th>Resources</th></tr>");
    for s in obs.subjects.iter().take(50) {
        let res = s
            .resources
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&s.subject),
            s.requests,
            s.denied,
            s.writes,
            s.exports,
            esc(&res)
        );
    }
    o.push_str("</table></body></html>\n");
    o
}
