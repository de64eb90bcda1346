"""The commands: what `crl audit`, `crl train` and `crl.audit_training` do from start to end,
the only layer that writes reports (crl.report) over the audit stages (crl.audit), which never
import it. `crl tune` is crl.tune, `crl report` crl.report.rebuild, `crl list` crl.cli."""
