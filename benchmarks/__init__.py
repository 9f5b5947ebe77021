"""Speed and quality benchmarks (run as scripts, or imported by ``openflow bench``); results as JSON."""
