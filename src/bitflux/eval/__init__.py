"""Quality evaluation: ShapeEval (GenEval's categories scored by a programmatic detector) for the demo model."""
