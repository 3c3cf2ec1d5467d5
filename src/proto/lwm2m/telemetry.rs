//! Payload + profile → TelemetryPoints (the product brief: "observe
//! notifications on those paths become numeric_values (or string_values) on
//! the telemetry point").
//!
//! Decoded values are mapped through the device profile to metric names and
//! kinds and grouped by timestamp (a SenML pack may carry several times): one
//! point per distinct timestamp. Values of a point are sorted by metric name,
//! each metric once (the last value for it wins). Integers stay integers
//! ([`Num`]). The common case, one value, allocates nothing but the point's
//! own small vectors inline.
//!
//! A profile with `publish_unmapped` publishes values no mapping covers
//! (observations set up by RPC on any path) under their path as the metric
//! name (`"/3/0/9"`), numeric, boolean or string by the value and the
//! resource's built-in type; otherwise they are only counted.

use super::content::{DataType, Num, ResourcePath, ResourceValue, Value};
use super::profile::{builtin_type, MetricKind, Profile};
use smallvec::SmallVec;

/// The values of one point, by kind.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PointValues<'p> {
    pub numeric: SmallVec<[(&'p str, Num); 4]>,
    pub string: SmallVec<[(&'p str, String); 1]>,
    pub boolean: SmallVec<[(&'p str, bool); 1]>,
}

impl PointValues<'_> {
    pub fn is_empty(&self) -> bool {
        self.numeric.is_empty() && self.string.is_empty() && self.boolean.is_empty()
    }
}

fn put<'p, T, A: smallvec::Array<Item = (&'p str, T)>>(
    v: &mut SmallVec<A>,
    metric: &'p str,
    value: T,
) {
    match v.binary_search_by(|(m, _)| m.cmp(&metric)) {
        Ok(i) => v[i].1 = value,
        Err(i) => v.insert(i, (metric, value)),
    }
}

/// Points built from one payload, with what was left out.
#[derive(Debug, Default)]
pub struct Points<'p> {
    /// (timestamp, values), in the order the timestamps first appeared.
    pub points: SmallVec<[(i64, PointValues<'p>); 1]>,
    /// Values no profile mapping covers (not published).
    pub unmapped: usize,
    /// Values that did not convert to their metric's kind.
    pub bad: usize,
}

/// The metric names of the values `profile` does not map, when it
/// publishes them (their paths; empty otherwise, without allocating).
/// Built before [`build_points`], which borrows them.
pub fn unmapped_names(
    profile: &Profile,
    values: &[ResourceValue<'_>],
) -> Vec<(ResourcePath, String)> {
    if !profile.publish_unmapped {
        return Vec::new();
    }
    let mut names: Vec<(ResourcePath, String)> = values
        .iter()
        .filter(|v| profile.mapping(&v.path).is_none())
        .map(|v| (v.path, v.path.to_string()))
        .collect();
    names.sort_by_key(|(p, _)| *p);
    names.dedup_by_key(|(p, _)| *p);
    names
}

/// How an unmapped value is published: by what it is, else by the
/// resource's built-in type (TLV and opaque carry no type of their own).
fn unmapped_kind(v: &Value<'_>, ty: Option<DataType>) -> MetricKind {
    match (v, ty) {
        (Value::Int(_) | Value::Float(_), _) => MetricKind::Numeric,
        (Value::Bool(_), _) | (_, Some(DataType::Boolean)) => MetricKind::Bool,
        (_, Some(DataType::Integer | DataType::Unsigned | DataType::Float | DataType::Time)) => {
            MetricKind::Numeric
        }
        _ => MetricKind::String,
    }
}

/// Maps `values` through `profile` (and `unmapped`, from
/// [`unmapped_names`]); `now_ms` is the timestamp of values without their
/// own time.
pub fn build_points<'p>(
    profile: &'p Profile,
    unmapped: &'p [(ResourcePath, String)],
    values: &[ResourceValue<'_>],
    now_ms: i64,
) -> Points<'p> {
    let mut out = Points::default();
    for v in values {
        let (metric, kind, data_type): (&'p str, MetricKind, Option<DataType>) =
            match profile.mapping(&v.path) {
                Some(m) => (&m.metric, m.kind, m.data_type),
                None => match unmapped.binary_search_by_key(&v.path, |(p, _)| *p) {
                    Ok(i) => {
                        let ty = builtin_type(&v.path.without_resource_instance());
                        (&unmapped[i].1, unmapped_kind(&v.value, ty), ty)
                    }
                    Err(_) => {
                        out.unmapped += 1;
                        continue;
                    }
                },
            };
        let ts = v.time_ms.unwrap_or(now_ms);
        let idx = match out.points.iter().position(|(t, _)| *t == ts) {
            Some(i) => i,
            None => {
                out.points.push((ts, PointValues::default()));
                out.points.len() - 1
            }
        };
        let pv = &mut out.points[idx].1;
        match kind {
            MetricKind::Numeric => match v.value.to_number(data_type) {
                Some(n) if n.is_finite() => put(&mut pv.numeric, metric, n),
                _ => out.bad += 1,
            },
            MetricKind::String => put(&mut pv.string, metric, v.value.to_string_value()),
            MetricKind::Bool => match v.value.to_bool() {
                Some(b) => put(&mut pv.boolean, metric, b),
                None => out.bad += 1,
            },
        }
    }
    out.points.retain(|(_, p)| !p.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::content::{self, ResourcePath};

    fn profile() -> Profile {
        Profile::builtin_default()
    }

    #[test]
    fn maps_groups_and_keeps_integers() {
        let p = profile();
        let senml = br#"[{"bn":"/3303/0/","bt":1700000000,"n":"5700","v":22.5},
                         {"bn":"/3/0/","n":"9","v":87},
                         {"bn":"/3303/0/","n":"5700","t":1700000060,"v":23},
                         {"bn":"","n":"/5/0/1","vs":"x"}]"#;
        let vals = content::decode(
            content::CF_SENML_JSON,
            ResourcePath::parse("/0").unwrap(),
            senml,
            0,
        )
        .unwrap();
        let pts = build_points(&p, &[], &vals, 5);
        assert_eq!(pts.unmapped, 1);
        assert_eq!(pts.points.len(), 2);
        let (ts, v) = &pts.points[0];
        assert_eq!(*ts, 1_700_000_000_000);
        assert_eq!(
            v.numeric.as_slice(),
            &[
                ("battery_level", Num::Int(87)),
                ("temperature", Num::Float(22.5))
            ]
        );
        // A float resource sent as an integer literal stays a float metric.
        assert_eq!(
            pts.points[1].1.numeric.as_slice(),
            &[("temperature", Num::Float(23.0))]
        );
    }

    #[test]
    fn unmapped_values_published_under_their_path_when_the_profile_says() {
        let mut p = profile();
        let senml = br#"[{"bn":"/3303/0/","n":"5700","v":22.5},
                         {"bn":"/3/0/","n":"0","vs":"ACME"},
                         {"bn":"","n":"/3/0/13","v":1700000000},
                         {"n":"/3311/0/5850","vb":true}]"#;
        let vals = content::decode(
            content::CF_SENML_JSON,
            ResourcePath::parse("/0").unwrap(),
            senml,
            0,
        )
        .unwrap();
        // Counted only, by default.
        assert!(unmapped_names(&p, &vals).is_empty());
        assert_eq!(build_points(&p, &[], &vals, 5).unmapped, 3);
        p.publish_unmapped = true;
        let names = unmapped_names(&p, &vals);
        assert_eq!(names.len(), 3);
        let pts = build_points(&p, &names, &vals, 5);
        assert_eq!(pts.unmapped, 0);
        let v = &pts.points[0].1;
        assert_eq!(
            v.numeric.as_slice(),
            &[
                ("/3/0/13", Num::Int(1700000000)),
                ("temperature", Num::Float(22.5))
            ]
        );
        assert_eq!(v.string.as_slice(), &[("/3/0/0", "ACME".to_string())]);
        assert_eq!(v.boolean.as_slice(), &[("/3311/0/5850", true)]);
        // TLV bytes of an unmapped integer resource are read by its type.
        let mut t = Vec::new();
        content::encode_tlv_resource(&mut t, content::tlv_kind::RESOURCE, 9, &[87]);
        let vals = content::decode(
            content::CF_TLV,
            ResourcePath::parse("/3/0/9").unwrap(),
            &t,
            0,
        )
        .unwrap();
        let mut q = Profile::builtin_default();
        q.resources.clear();
        q.publish_unmapped = true;
        let names = unmapped_names(&q, &vals);
        let pts = build_points(&q, &names, &vals, 5);
        assert_eq!(
            pts.points[0].1.numeric.as_slice(),
            &[("/3/0/9", Num::Int(87))]
        );
    }
}
