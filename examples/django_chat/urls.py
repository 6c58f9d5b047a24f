"""No HTTP views: the example is about websockets."""

urlpatterns: list[object] = []
