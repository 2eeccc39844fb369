"""MLflow "models from code" entry point of the registered DiPro pyfunc.

MLflow copies this file into the logged model and runs it at load time; it
names the model class instead of pickling an instance (see
:mod:`dipro.tracking.pyfunc`).  Importing it has one effect: ``set_model``.
"""
from mlflow.models import set_model

from dipro.tracking.pyfunc import DiProPyfunc

set_model(DiProPyfunc())
