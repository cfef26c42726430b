"""Operating kopa: liveness, readiness and the components' supervisor; none of it is a hop of an event."""
