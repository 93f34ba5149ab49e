"""SQLAlchemy 2 ORM (on psycopg 3 and on psycopg2): declarative models,
Session add/commit, queries, rollback after an error, session.begin().

SQLAlchemy opens a transaction block before the first statement of every
Session (DBAPI autocommit off), so all of a Session's statements run on the
primary; an AUTOCOMMIT engine sends reads to the replica."""

import pytest
from sqlalchemy import ForeignKey, String, create_engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

DRIVERS = ["psycopg", "psycopg2"]


def models(prefix):
    """Fresh declarative classes (own metadata) on `prefix`-named tables."""

    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"{prefix}_author"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50), unique=True)
        books: Mapped[list["Book"]] = relationship(
            back_populates="author", cascade="all, delete-orphan", order_by="Book.id"
        )

    class Book(Base):
        __tablename__ = f"{prefix}_book"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(100))
        author_id: Mapped[int] = mapped_column(ForeignKey(f"{prefix}_author.id"))
        author: Mapped[Author] = relationship(back_populates="books")

    return Base, Author, Book


def engine_for(env, driver, **kw):
    url = env.url.replace("postgres://", f"postgresql+{driver}://", 1)
    return create_engine(url, connect_args={"connect_timeout": 10}, **kw)


PORT = select(func.inet_server_port())


@pytest.mark.parametrize("driver", DRIVERS)
def test_orm(env, route, driver):
    prefix = f"sa_{driver}"
    Base, Author, Book = models(prefix)
    engine = engine_for(env, driver)
    reads = engine.execution_options(isolation_level="AUTOCOMMIT")
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)

        # add / commit
        with Session(engine) as s:
            route.primary(s.scalar(PORT), "read in a Session (its block)")
            ann = Author(name="Ann", books=[Book(title="A1"), Book(title="A2")])
            bob = Author(name="Bob", books=[Book(title="B1")])
            s.add_all([ann, bob])
            s.commit()
            assert ann.id is not None and bob.id is not None

        # query
        with Session(engine) as s:
            names = s.scalars(select(Author.name).order_by(Author.name)).all()
            assert names == ["Ann", "Bob"]
            ann = s.scalars(select(Author).where(Author.name == "Ann")).one()
            assert [b.title for b in ann.books] == ["A1", "A2"]
            rows = s.execute(
                select(Author.name, func.count(Book.id))
                .join(Book)
                .group_by(Author.name)
                .order_by(Author.name)
            ).all()
            assert [tuple(r) for r in rows] == [("Ann", 2), ("Bob", 1)]
            route.primary(s.scalar(PORT), "read in a Session (its block)")

        # Autocommit reads go to the replica and see the commits.
        with Session(reads) as s:
            route.replica(s.scalar(PORT), "read, autocommit")
            n, port = s.execute(select(func.count(Book.id), func.inet_server_port())).one()
            assert n == 3
            route.replica(port, "ORM read, autocommit")
        with reads.connect() as c:
            n, port = c.execute(
                text(f"SELECT count(*), inet_server_port() FROM {prefix}_author")
            ).one()
            assert n == 2
            route.replica(port, "Core read, autocommit")

        # Rollback after an error: the session is usable again.
        with Session(engine) as s:
            s.add(Author(name="Cy"))
            s.flush()
            s.add(Author(name="Ann"))
            with pytest.raises(IntegrityError) as e:
                s.commit()
            orig = e.value.orig
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            assert code == "23505"
            s.rollback()
            assert s.scalar(select(func.count(Author.id))) == 2
            s.add(Author(name="Dee"))
            s.commit()

        # session.begin(): commits at the end of the block ...
        with Session(engine) as s:
            with s.begin():
                s.add(Author(name="Eve", books=[Book(title="E1")]))
                route.primary(s.scalar(PORT), "read in session.begin()")
            # ... or rolls back when the block raises.
            with pytest.raises(RuntimeError):
                with s.begin():
                    s.add(Author(name="Fay"))
                    s.flush()
                    raise RuntimeError("roll back")
        with Session(reads) as s:
            names = s.scalars(select(Author.name).order_by(Author.name)).all()
            assert names == ["Ann", "Bob", "Dee", "Eve"]
            route.replica(s.scalar(PORT), "read, autocommit")

        # Update and delete through the ORM.
        with Session(engine) as s, s.begin():
            bob = s.scalars(select(Author).where(Author.name == "Bob")).one()
            bob.books[0].title = "B1, revised"
            s.delete(s.scalars(select(Author).where(Author.name == "Dee")).one())
        with Session(reads) as s:
            assert s.scalar(select(Book.title).join(Author).where(Author.name == "Bob")) == (
                "B1, revised"
            )
            assert s.scalar(select(func.count(Author.id))) == 3
            route.replica(s.scalar(PORT), "read, autocommit")

        # Pooled connections are returned with a ROLLBACK and reused.
        for _ in range(5):
            with Session(reads) as s:
                route.replica(s.scalar(PORT), "read on a reused pooled connection")
        route.verify()
    finally:
        engine.dispose()
