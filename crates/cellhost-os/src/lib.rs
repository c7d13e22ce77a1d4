//! Small OS helpers with no dependency beyond libc and nix, so the static
//! guest agent links them without the rest of cellhost: `mountinfo`
//! (`/proc/self/mountinfo` parsed) and `ifconfig` (one IPv4 address and a
//! default route by ioctls).

pub mod ifconfig;
pub mod mountinfo;
