"""One plain (sync) Django view: what a form handler or an admin action does to reach the
websockets, through asgiref's ``async_to_sync``."""

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpRequest, JsonResponse
from django.urls import path

from .consumers import GROUP


def broadcast(request: HttpRequest) -> JsonResponse:
    body = request.GET.get("body", "")
    async_to_sync(get_channel_layer().group_send)(
        GROUP, {"type": "chat.message", "body": body, "via": "view"}
    )
    return JsonResponse({"sent": body})


urlpatterns = [path("broadcast", broadcast)]
