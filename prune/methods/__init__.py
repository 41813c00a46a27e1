"""Pruning methods. Each is a class named by `_target_` in conf/method/<name>.yaml."""
