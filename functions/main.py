"""Function entry points for functions-framework (one Knative Service per target)."""
