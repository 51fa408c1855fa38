//! One offloaded build end to end, and the choice of machine with failover.
