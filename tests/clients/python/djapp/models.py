from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=50, unique=True)
    qty = models.IntegerField(default=0)

    class Meta:
        db_table = "dj_item"
        app_label = "djapp"
