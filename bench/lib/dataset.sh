# Sourced by the benchmarks: the Zmanim-like dataset's SQL. `zmanim_dataset_sql ROWS` prints what
# fills an (empty) database with a schema that compresses like real data: publishers, ~163k cities
# with names and PostGIS points, and ROWS zmanim rows with times and text (about 5.2 M rows a GiB
# on disk), then VACUUM ANALYZE.
zmanim_dataset_sql() {
    cat <<SQL
create extension if not exists postgis;
create table publishers(id int primary key, name text not null, url text not null, contact text);
insert into publishers select g, 'Publisher ' || g || ' of ' || (array['Jerusalem','Bnei Brak','Lakewood','Antwerp','London','Monsey'])[1 + g % 6],
       'https://zmanim.example/' || md5(g::text), 'rabbi' || g || '@example.org' from generate_series(1, 2000) g;
create table cities(id int primary key, name text not null, country text not null, tz text not null,
                    elevation_m int, loc geometry(Point, 4326) not null);
insert into cities select g, (array['Beit','Kfar','Ramat','Givat','Neve','Ir'])[1 + g % 6] || ' ' || initcap(substr(md5(g::text), 1, 3 + g % 7)),
       (array['IL','US','GB','FR','BE','CA','AR','AU','ZA','DE'])[1 + g % 10], 'Zone/' || (g % 400), g % 3000,
       st_setsrid(st_makepoint(((g::bigint * 7919) % 36000) / 100.0 - 180, ((g::bigint * 104729) % 17000) / 100.0 - 85), 4326)
  from generate_series(1, 163000) g;
create table zmanim(id bigint primary key, city int not null references cities, publisher int references publishers,
                    day date not null, alot time, sunrise time, sof_zman_shema time, chatzot time, mincha time,
                    sunset time, tzeit time, note text);
insert into zmanim select g, 1 + g % 163000, 1 + g % 2000, '2026-01-01'::date + (g / 163000)::int % 3650,
       '04:30'::time + (g % 61) * interval '1 minute', '06:00'::time + (g % 53) * interval '1 minute',
       '09:10'::time + (g % 41) * interval '1 minute', '12:30'::time + (g % 31) * interval '1 minute',
       '13:05'::time + (g % 29) * interval '1 minute', '19:00'::time + (g % 71) * interval '1 minute',
       '19:40'::time + (g % 67) * interval '1 minute',
       case when g % 3 = 0 then 'candle lighting ' || (18 + g % 22) || ' min before sunset; ' || substr(md5(g::text), 1, 6 + g % 10)
            when g % 3 = 1 then 'per ' || (array['Magen Avraham','Gra','Baal HaTanya','Rabbeinu Tam'])[1 + g % 4]
            else null end
  from generate_series(1, $1) g;
vacuum analyze;
SQL
}
