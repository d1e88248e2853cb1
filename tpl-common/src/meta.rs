//! Our `<metadata>` element: the template and clone state tpl keeps in libvirt, read and written.

use xmltree::{Element, XMLNode};

use std::path::PathBuf;

use crate::domxml::children_named;
use crate::error::{Error, Result};
use crate::record::{CloneMode, CloneOrigin, Generalized, Method, Reserved, Step, TemplateState};

/// Our XML namespace inside `<metadata>`; libvirt keys the element by it.
pub const NS: &str = "urn:x-tpl:template:1";
/// The prefix libvirt writes our element under.
pub const PREFIX: &str = "tpl";

/// How many steps the history keeps: the newest ones. A template cloned and unlocked
/// every night would otherwise grow its definition without bound.
pub const MAX_HISTORY: usize = 50;

/// Everything tpl stores on a domain.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub template: TemplateState,
    pub clone: Option<CloneOrigin>,
    pub history: Vec<Step>,
    /// The linked clones' overlays tpl-clone made on this template, registered when they
    /// were made: where an overlay is can then be known even after its domain is gone
    /// (undefined, its file kept) and it lies outside every directory a scan looks at.
    pub overlays: Vec<Registered>,
}

/// One overlay tpl-clone made on a template's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub path: PathBuf,
    pub clone_uuid: String,
    pub clone_name: String,
    pub at: String,
}

impl Meta {
    /// Append a step to the history, keeping the newest [`MAX_HISTORY`].
    pub fn record_step(&mut self, tool: &str, detail: impl Into<String>) {
        self.history.push(Step {
            tool: tool.into(),
            at: crate::now_rfc3339(),
            detail: detail.into(),
        });
        let extra = self.history.len().saturating_sub(MAX_HISTORY);
        self.history.drain(..extra);
    }

    pub fn to_xml(&self) -> String {
        let mut root = Element::new("template");
        root.namespace = Some(NS.into());
        let mut ns = xmltree::Namespace::empty();
        ns.put("", NS);
        root.namespaces = Some(ns);
        let t = &self.template;
        if let Some(g) = &t.generalized {
            let method = g.method.as_str().to_string();
            let mut e = elem(
                "generalized",
                &[("at", Some(&g.at)), ("method", Some(&method))],
            );
            set_opt(&mut e, "tool", g.tool.as_deref());
            set_opt(&mut e, "hostname", g.hostname.as_deref());
            e.attributes
                .insert("operations".into(), g.operations.join(","));
            root.children.push(XMLNode::Element(e));
        }
        if t.locked {
            let mut e = elem(
                "locked",
                &[
                    ("at", t.locked_at.as_ref()),
                    ("snapshot", t.snapshot.as_ref()),
                ],
            );
            e.attributes.insert(
                "immutable".into(),
                if t.immutable { "yes" } else { "no" }.into(),
            );
            root.children.push(XMLNode::Element(e));
        }
        if let Some(c) = &self.clone {
            let mode = c.mode.as_str().to_string();
            let seed = c.seed.as_ref().map(|p| p.to_string_lossy().into_owned());
            let mut e = elem(
                "clone",
                &[
                    ("template-uuid", Some(&c.template_uuid)),
                    ("template-name", Some(&c.template_name)),
                    ("mode", Some(&mode)),
                    ("at", Some(&c.at)),
                    ("seed", seed.as_ref()),
                ],
            );
            if let Some(r) = &c.reserved {
                let ip = r.ip.to_string();
                e.children.push(XMLNode::Element(elem(
                    "reserved",
                    &[
                        ("network", Some(&r.network)),
                        ("mac", Some(&r.mac)),
                        ("ip", Some(&ip)),
                    ],
                )));
            }
            root.children.push(XMLNode::Element(e));
        }
        if !self.overlays.is_empty() {
            let mut o = Element::new("overlays");
            for r in &self.overlays {
                let path = r.path.to_string_lossy().into_owned();
                o.children.push(XMLNode::Element(elem(
                    "overlay",
                    &[
                        ("path", Some(&path)),
                        ("clone-uuid", Some(&r.clone_uuid)),
                        ("clone-name", Some(&r.clone_name)),
                        ("at", Some(&r.at)),
                    ],
                )));
            }
            root.children.push(XMLNode::Element(o));
        }
        if !self.history.is_empty() {
            let mut h = Element::new("history");
            for s in &self.history {
                let mut e = elem("step", &[("tool", Some(&s.tool)), ("at", Some(&s.at))]);
                e.children.push(XMLNode::Text(s.detail.clone()));
                h.children.push(XMLNode::Element(e));
            }
            root.children.push(XMLNode::Element(h));
        }
        let mut out = Vec::new();
        let cfg = xmltree::EmitterConfig::new().write_document_declaration(false);
        root.write_with_config(&mut out, cfg)
            .expect("writing XML to memory cannot fail");
        String::from_utf8(out).expect("xmltree writes UTF-8")
    }

    /// Our metadata, from the `<metadata>` of a definition (the element libvirt keys by
    /// our namespace): the same [`Meta`] that `Dom::meta` reads, without asking libvirt.
    pub fn of_definition(x: &crate::domxml::DomainXml) -> Result<Meta> {
        let Some(md) = x.root.get_child("metadata") else {
            return Ok(Meta::default());
        };
        for e in md.children.iter().filter_map(|c| c.as_element()) {
            if e.namespace.as_deref() == Some(NS) {
                let mut out = Vec::new();
                let cfg = xmltree::EmitterConfig::new().write_document_declaration(false);
                e.write_with_config(&mut out, cfg)
                    .expect("writing XML to memory cannot fail");
                return Meta::from_xml(&String::from_utf8_lossy(&out));
            }
        }
        Ok(Meta::default())
    }

    pub fn from_xml(xml: &str) -> Result<Meta> {
        let bad = |why: String| Error::failed("cannot read tpl's metadata on the domain", why);
        let root = Element::parse(xml.as_bytes()).map_err(|e| bad(e.to_string()))?;
        // libvirt hands back the element it keyed by NS with the namespace stripped.
        if root.namespace.as_deref().is_some_and(|ns| ns != NS) {
            return Err(bad(format!("unexpected namespace {:?}", root.namespace)));
        }
        let get = |e: &Element, a: &str| e.attributes.get(a).cloned();
        let mut m = Meta::default();
        if let Some(g) = root.get_child("generalized") {
            let method = get(g, "method").unwrap_or_default();
            m.template.generalized = Some(Generalized {
                at: get(g, "at").unwrap_or_default(),
                method: Method::parse(&method)
                    .ok_or_else(|| bad(format!("unknown generalization method {method:?}")))?,
                tool: get(g, "tool"),
                hostname: get(g, "hostname"),
                operations: get(g, "operations")
                    .map(|o| {
                        o.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        if let Some(l) = root.get_child("locked") {
            m.template.locked = true;
            m.template.locked_at = get(l, "at");
            m.template.immutable = get(l, "immutable").as_deref() == Some("yes");
            m.template.snapshot = get(l, "snapshot");
        }
        if let Some(c) = root.get_child("clone") {
            let mode = get(c, "mode").unwrap_or_default();
            m.clone = Some(CloneOrigin {
                template_uuid: get(c, "template-uuid").unwrap_or_default(),
                template_name: get(c, "template-name").unwrap_or_default(),
                mode: CloneMode::parse(&mode)
                    .ok_or_else(|| bad(format!("unknown clone mode {mode:?}")))?,
                at: get(c, "at").unwrap_or_default(),
                seed: get(c, "seed").map(PathBuf::from),
                reserved: c.get_child("reserved").and_then(|r| {
                    Some(Reserved {
                        network: get(r, "network")?,
                        mac: get(r, "mac")?,
                        ip: get(r, "ip")?.parse().ok()?,
                    })
                }),
            });
        }
        if let Some(o) = root.get_child("overlays") {
            m.overlays = children_named(o, "overlay")
                .filter_map(|e| {
                    Some(Registered {
                        path: PathBuf::from(get(e, "path")?),
                        clone_uuid: get(e, "clone-uuid").unwrap_or_default(),
                        clone_name: get(e, "clone-name").unwrap_or_default(),
                        at: get(e, "at").unwrap_or_default(),
                    })
                })
                .collect();
        }
        if let Some(h) = root.get_child("history") {
            m.history = children_named(h, "step")
                .map(|s| Step {
                    tool: get(s, "tool").unwrap_or_default(),
                    at: get(s, "at").unwrap_or_default(),
                    detail: s.get_text().map(|t| t.into_owned()).unwrap_or_default(),
                })
                .collect();
        }
        Ok(m)
    }
}

fn elem(name: &str, attrs: &[(&str, Option<&String>)]) -> Element {
    let mut e = Element::new(name);
    for (k, v) in attrs {
        set_opt(&mut e, k, v.map(String::as_str));
    }
    e
}

fn set_opt(e: &mut Element, k: &str, v: Option<&str>) {
    if let Some(v) = v {
        e.attributes.insert(k.to_string(), v.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_everything() {
        let mut m = Meta::default();
        m.template.generalized = Some(Generalized {
            at: "2026-01-01T00:00:00Z".into(),
            method: Method::VirtSysprep,
            tool: Some("virt-sysprep 1.48.2".into()),
            operations: vec!["defaults".into(), "-lvm-uuids".into()],
            hostname: Some("Tpl".into()),
        });
        m.template.locked = true;
        m.template.locked_at = Some("2026-01-02T00:00:00Z".into());
        m.template.immutable = true;
        m.template.snapshot = Some("tpl".into());
        m.clone = Some(CloneOrigin {
            template_uuid: "u".into(),
            template_name: "T & <x>".into(),
            mode: CloneMode::Linked,
            at: "t".into(),
            seed: Some("/i/c1 & <x>-cidata.img".into()),
            reserved: Some(Reserved {
                network: "tplnet".into(),
                mac: "52:54:00:01:02:03".into(),
                ip: "192.168.123.10".parse().unwrap(),
            }),
        });
        m.overlays.push(Registered {
            path: "/other/c1.qcow2".into(),
            clone_uuid: "u1".into(),
            clone_name: "c1 & <x>".into(),
            at: "t".into(),
        });
        m.record_step("tpl-rename", "renamed 'a' to 'b'");
        let back = Meta::from_xml(&m.to_xml()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn history_keeps_the_newest_steps() {
        let mut m = Meta::default();
        for i in 0..(MAX_HISTORY + 30) {
            m.record_step("t", format!("step {i}"));
        }
        assert_eq!(m.history.len(), MAX_HISTORY);
        assert_eq!(m.history[0].detail, "step 30");
        assert_eq!(
            m.history.last().unwrap().detail,
            format!("step {}", MAX_HISTORY + 29)
        );
    }

    #[test]
    fn reads_what_libvirt_returns_with_a_prefix() {
        let xml = format!("<tpl:template xmlns:tpl=\"{NS}\"><tpl:locked at=\"x\" immutable=\"no\"/></tpl:template>");
        let m = Meta::from_xml(&xml).unwrap();
        assert!(m.template.locked && !m.template.immutable);
        assert!(Meta::from_xml("<template xmlns=\"urn:other\"/>").is_err());
        let bare = "<template><history><step tool=\"t\" at=\"a\">d</step></history></template>";
        assert_eq!(Meta::from_xml(bare).unwrap().history[0].detail, "d");
    }
}
