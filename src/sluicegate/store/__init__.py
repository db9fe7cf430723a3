"""Config stores: where routes, upstreams and the other resources live (file or etcd)."""
