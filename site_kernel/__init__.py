"""FLIP Lab's site kernel: what a hospital runs to take part in federated studies on its own terms."""
