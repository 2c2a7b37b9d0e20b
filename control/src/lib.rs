//! The mesh control plane (filled in by the control-plane issue).
