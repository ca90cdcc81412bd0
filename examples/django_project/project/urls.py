from django.urls import path

from notifications import views

urlpatterns = [
    path("", views.index),
    path("page/<str:user_id>/", views.page, name="page"),
    path("notify/<str:user_id>/", views.notify_user, name="notify"),
    path("notify-async/<str:user_id>/", views.notify_async, name="notify-async"),
    path("add/", views.add_view, name="add"),
    path("add-async/", views.add_async_view, name="add-async"),
]
