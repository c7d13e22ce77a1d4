//! Reading the host's mount table and cgroup hierarchies.
//!
//! Layout on the host: the process tier puts each cell's cgroup at
//! `<hierarchy>/cellhost/<instance>/cellhost-<id>` in every mounted
//! hierarchy that libcontainer uses (each v1 controller on a v1 or hybrid
//! host; the unified hierarchy on a v2 host). The naming and discovery live
//! in [`cellhost_host::cgroups`], shared with the qemu tiers (each VM's
//! qemu has a cgroup named the same way); they are re-exported here. This
//! module creates nothing (libcontainer creates the cgroups, teardown
//! removes them).
//!
//! Threat model: the mount table and cgroup files are kernel-provided but
//! their *contents* (mount points, paths) can contain anything a cell's
//! creator chose; parsing never panics and treats odd lines as absent.

pub use cellhost_host::cgroups::{
    CGROUP_PARENT, CellCgroups, Hierarchy, cell_cgroup_names, cell_cgroup_names_in, cgroup_object,
    hierarchies, hierarchies_from, instance_tag, remove_instance_group,
};
pub use cellhost_os::mountinfo::{MountEntry, mounts_under};
