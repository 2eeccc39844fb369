"""MLflow tracking and registry for DiPro (docs/ARCHITECTURE.md section 7).

    tracker = Tracker.create_in_driver(cfg, run_name)   # driver; picklable, hand it to the workers
    tracker.log_metrics({...}, step)                    # rank 0; buffered, never raises on outages
    tracker.log_evaluation("test", eval_result)         # curves, confusion matrices, region attention
    tracker.finish("FINISHED")
    version = register_checkpoint(cfg, checkpoint_dir, tracker.run_id, test_metrics, tracker.data_fingerprint)

Registry: :func:`list_versions`, :func:`promote`; batch inference: :mod:`dipro.tracking.predict`;
the served model: :mod:`dipro.tracking.pyfunc`.
"""
from dipro.tracking.provenance import data_fingerprint
from dipro.tracking.registry import list_versions, model_name, promote, register_checkpoint
from dipro.tracking.tracker import Tracker
from dipro.tracking.uri import check_reachable, resolve_tracking_uri

__all__ = [
    "Tracker", "register_checkpoint", "list_versions", "promote", "model_name",
    "data_fingerprint", "resolve_tracking_uri", "check_reachable",
]
