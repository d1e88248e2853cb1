//! The listing for people: a tree of templates with their clones (and orphaned overlays) under them, in columns, sizes in binary units, and one summary line; every name and path escaped as every message is.

use std::fmt::Write;

use tpl_common::record::CloneMode;
use tpl_common::text::{shown, shown_path};

use crate::inventory::{Inventory, Item, Role};
use crate::Shown;

/// Bytes in binary units as `ls -lh` and `du -h` count them: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// One line of the table: tree prefix and name, kind, state, allocated, details.
type Row = [String; 5];

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn template_details(items: &[Item], it: &Item) -> String {
    let t = &it.rec.template;
    let mut parts = Vec::new();
    match &t.generalized {
        Some(g) => parts.push(format!(
            "generalized {} by {}",
            shown(&g.at),
            shown(g.tool.as_deref().unwrap_or(g.method.as_str()))
        )),
        None => parts.push("not generalized".to_string()),
    }
    if t.locked {
        let since = t
            .locked_at
            .as_deref()
            .map(|a| format!(" {}", shown(a)))
            .unwrap_or_default();
        let imm = if t.immutable { ", immutable" } else { "" };
        parts.push(format!("locked{since}{imm}"));
    } else {
        parts.push("NOT locked".to_string());
    }
    match (it.version_of, &it.version) {
        (Some(s), _) => parts.push(format!("older version of '{}'", shown(items[s].name()))),
        (None, Some(v)) => {
            let older = if it.versions.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} kept)",
                    plural(it.versions.len(), "older one", "older ones")
                )
            };
            parts.push(format!("version {}{older}", shown(v)));
        }
        (None, None) => {}
    }
    if let Some(o) = &it.rec.clone {
        parts.push(format!(
            "itself a {} clone of '{}'",
            o.mode.as_str(),
            shown(&o.template_name)
        ));
    }
    let linked = it
        .children
        .iter()
        .filter(|&&c| items[c].mode == Some(CloneMode::Linked))
        .count();
    let full = it.children.len() - linked;
    if linked > 0 || !it.orphans.is_empty() {
        let mut what = plural(linked, "linked clone", "linked clones");
        if !it.orphans.is_empty() {
            let _ = write!(
                what,
                ", {}",
                plural(it.orphans.len(), "orphaned overlay", "orphaned overlays")
            );
        }
        parts.push(format!("{what}: {}", human(it.linked_allocated(items))));
    }
    if full > 0 {
        parts.push(plural(full, "full clone", "full clones"));
    }
    parts.extend(it.problems.iter().cloned());
    parts.join("; ")
}

fn clone_details(items: &[Item], it: &Item) -> String {
    let mut parts = Vec::new();
    match (it.parent, &it.rec.clone) {
        (None, Some(o)) => parts.push(format!(
            "its template '{}' (UUID {}) is {}",
            shown(&o.template_name),
            shown(&o.template_uuid),
            if it.problems.is_empty() {
                "not on this connection"
            } else {
                "gone"
            }
        )),
        (Some(p), _) => {
            // Where it lives, when not next to its template's image (tpl-clone --dir).
            let home = items[p].images.first().and_then(|i| i.parent());
            if let Some(d) = it.images.first().and_then(|i| i.parent()) {
                if home != Some(d) {
                    parts.push(format!("in {}", shown_path(d)));
                }
            }
        }
        (None, None) => {}
    }
    parts.extend(it.problems.iter().cloned());
    parts.join("; ")
}

fn row(items: &[Item], it: &Item, prefix: &str) -> Row {
    let (kind, details) = match it.role {
        Role::Template => ("template", template_details(items, it)),
        Role::Clone => (
            it.mode.map_or("clone", CloneMode::as_str),
            clone_details(items, it),
        ),
        Role::Plain => ("plain", String::new()),
    };
    [
        format!("{prefix}{}", shown(it.name())),
        kind.to_string(),
        it.rec.state.as_str().to_string(),
        human(it.allocated),
        details,
    ]
}

fn orphan_row(o: &crate::inventory::Orphan, prefix: &str) -> Row {
    let how = match &o.registered {
        Some(r) => format!(
            "made by tpl-clone for clone '{}', which is gone",
            shown(&r.clone_name)
        ),
        None => "found in the directory scan".to_string(),
    };
    [
        format!("{prefix}(no domain)"),
        "overlay".into(),
        "-".into(),
        human(o.allocated),
        format!("{}: ORPHANED, {how}", shown_path(&o.path)),
    ]
}

/// The tree of what is shown, and a summary line. `with_orphans`: list each template's
/// orphaned overlays under it (not with --templates, which lists no clones either).
pub fn render(inv: &Inventory, shown: &[Shown], with_orphans: bool) -> String {
    let items = &inv.items;
    let mut rows: Vec<Row> = vec![[
        "NAME".into(),
        "KIND".into(),
        "STATE".into(),
        "ALLOCATED".into(),
        "DETAILS".into(),
    ]];
    let mut k = 0;
    while k < shown.len() {
        let it = &items[shown[k].item];
        rows.push(row(items, it, ""));
        k += 1;
        let start = k;
        while k < shown.len() && shown[k].depth > 0 {
            k += 1;
        }
        let kids = &shown[start..k];
        let orphans: &[crate::inventory::Orphan] = if with_orphans { &it.orphans } else { &[] };
        let n = kids.len() + orphans.len();
        let glyph = |j: usize| if j + 1 == n { "└─ " } else { "├─ " };
        for (j, c) in kids.iter().enumerate() {
            rows.push(row(items, &items[c.item], glyph(j)));
        }
        for (j, o) in orphans.iter().enumerate() {
            rows.push(orphan_row(o, glyph(kids.len() + j)));
        }
    }
    let mut width = [0usize; 4];
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            let pad = width.get(i).map_or(0, |w| w - cell.chars().count());
            // Sizes line up on the right, as in ls -l; the rest on the left.
            if i == 3 {
                let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
            } else if i < 4 {
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&summary(items, shown, with_orphans));
    out.push('\n');
    out
}

/// `2 templates (1 older version), 3 clones (2 linked, 1 full), 1 orphan; 1.2 GiB allocated`.
fn summary(items: &[Item], shown: &[Shown], with_orphans: bool) -> String {
    let (mut templates, mut older, mut linked, mut full, mut plain) = (0, 0, 0, 0, 0);
    let (mut orphans, mut broken, mut bytes) = (0, 0, 0u64);
    for s in shown {
        let it = &items[s.item];
        bytes += it.allocated;
        match it.role {
            Role::Template => {
                templates += 1;
                older += usize::from(it.version_of.is_some());
                if with_orphans {
                    orphans += it.orphans.len();
                    bytes += it.orphans.iter().map(|o| o.allocated).sum::<u64>();
                }
            }
            Role::Clone if it.mode == Some(CloneMode::Full) => full += 1,
            Role::Clone => linked += 1,
            Role::Plain => plain += 1,
        }
        broken += usize::from(!it.problems.is_empty());
    }
    let mut out = plural(templates, "template", "templates");
    if older > 0 {
        let _ = write!(
            out,
            " ({})",
            plural(older, "older version", "older versions")
        );
    }
    // --templates lists no clones: no count of them either.
    if with_orphans {
        let _ = write!(
            out,
            ", {} ({linked} linked, {full} full)",
            plural(linked + full, "clone", "clones")
        );
    }
    if plain > 0 {
        let _ = write!(out, ", {}", plural(plain, "other domain", "other domains"));
    }
    if orphans + broken == 0 {
        out.push_str(", no orphans");
    } else {
        if orphans > 0 {
            let _ = write!(
                out,
                ", {}",
                plural(orphans, "orphaned overlay", "orphaned overlays")
            );
        }
        if broken > 0 {
            let _ = write!(
                out,
                ", {}",
                plural(
                    broken,
                    "broken or orphaned domain",
                    "broken or orphaned domains"
                )
            );
        }
    }
    let _ = write!(out, "; {} allocated", human(bytes));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(64 << 20), "64.0 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(u64::MAX), "16.0 EiB");
    }
}
