"""The reliability and security suite: load, faults, hostile input, escape attempts and
identity attacks (docs/RELIABILITY.md). Sizes scale up under JOBD_SOAK=1 (`just soak`)."""
